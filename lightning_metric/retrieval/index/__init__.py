"""EmbeddingIndex: a searchable directory of embeddings written by ``EmbeddingIndexWriter``.

The directory holds only FAISS and NumPy files plus JSON, all read without pickle:

    manifest.json    format, version, embedding size, metric, count, FAISS factory string and
                     search parameters (nprobe, efSearch), model / data description; the
                     Matryoshka prefix ``dim``, ``precision`` (float32 / int8 / binary), the
                     int8 ``calibration`` (low / high per dimension) and ``rescore_multiplier``
                     (missing in older indexes: float32, full dimension)
    index.faiss      FAISS index built by ``faiss.index_factory(factory)`` ("Flat" = exact;
                     "HNSW32", "IVF1024,Flat", "IVF1024,PQ16", ... approximate), inner
                     product for cosine/ip, L2 for l2; int8: an IndexScalarQuantizer ("SQ8")
                     or "IVF<n>,SQ8"; binary: an IndexBinaryFlat (faiss.read_index_binary)
    embeddings.npy   float32 [N, D], as the model produced them
                     (index.faiss holds them L2-normalised for the cosine metric)
    ids.npy          int64 [N], the item ids search returns (dataset index by default)
    labels.npy       int64 [N], class labels (-1 where unknown)
    paths.txt        optional, one source file per item (image-folder data sets)

The manifest records the SHA-256 of every other file (``"sha256"``: file name -> hex digest;
``sha256sum index.faiss`` prints the same), and :meth:`EmbeddingIndex.load` checks them all
before answering, so a file changed, truncated or copied from another save after it was
written raises :class:`IndexFormatError` naming it. The manifest cannot hash itself: its
``factory`` and ``faiss_index`` are checked against the structure of ``index.faiss``, and its
count, dimension and metric against every file; its search parameters and ``info`` are
settings and a description, not stored data, and are taken as they are.
``load(directory, verify=False)`` skips only the hashes, which read every byte once more, for
large indexes whose storage is trusted (``python benchmarks/index.py --load-only`` measures
both). Indexes saved before hashes existed (format version 1) still load, with a warning,
until saved again.

Example::

    index = EmbeddingIndex.load("outputs/digits_arcface/index")
    ids, scores = index.search(query_embeddings, k=5)
    approx = EmbeddingIndex(embeddings, factory="IVF1024,Flat", nprobe=16)  # trained on them
    compact = EmbeddingIndex(embeddings, dim=64, precision="binary", rescore_multiplier=4)
    index.add(new_embeddings, ids=new_ids)
    index.save()
"""

from lightning_metric.retrieval.index.core import EmbeddingIndex, SearchResult
from lightning_metric.retrieval.index.embedding import embed, embed_loader
from lightning_metric.retrieval.index.files import FORMAT, MANIFEST, VERSION, IndexFormatError

__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "EmbeddingIndex",
    "IndexFormatError",
    "SearchResult",
    "embed",
    "embed_loader",
]

"""k-nearest-neighbour classification on cosine similarity, the paper's patch-level score.

The paper labels each test patch with its nearest training patch (k = 1) and reports F1;
for k > 1 the neighbours vote with weights that grow with similarity. Searches run in chunks of queries (and, on
torch, of the bank), so memory is bounded by the bank plus one chunk's results.

Backends, chosen by :func:`choose_backend` when ``auto``:
- ``faiss-gpu``: faiss IndexFlatIP on a GPU (needs a faiss build with GPU support);
- ``torch-cuda``: exact matmul + top-k on the GPU in chunks (no faiss-gpu needed);
- ``faiss-cpu``: faiss IndexFlatIP on the CPU (BLAS, all cores);
- ``torch-cpu``: the same chunked search as torch-cuda, on the CPU.
All four are exact; they differ only in speed.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from clusiam.errors import ConfigError

BACKENDS = ("faiss-gpu", "torch-cuda", "faiss-cpu", "torch-cpu")
QUERY_CHUNK = 4096
BANK_CHUNK = 65536  # a chunk pair is 4096 x 65536 fp32 similarities: 1 GiB
VOTE_TEMPERATURE = 0.07
FAISS_GPU_MAX_K = 2048  # the largest k faiss-gpu selects (its GPU_MAX_SELECTION_K)


def faiss_gpu_usable() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_backend(requested: str = "auto", k: int = 1) -> str:
    """The fastest exact backend here for ``k`` neighbours: faiss-gpu (up to k = 2048), then
    torch-cuda, then faiss-cpu."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise ConfigError(f"--backend {requested!r} is unknown; choose auto or one of {', '.join(BACKENDS)}")
        if requested == "faiss-gpu" and not faiss_gpu_usable():
            raise ConfigError("--backend faiss-gpu: no GPU-enabled faiss with a visible GPU; use --backend auto")
        if requested == "faiss-gpu" and k > FAISS_GPU_MAX_K:
            raise ConfigError(f"--backend faiss-gpu selects at most {FAISS_GPU_MAX_K} neighbours, not --k {k}; "
                              "use --backend torch-cuda")
        if requested == "torch-cuda" and not torch.cuda.is_available():
            raise ConfigError("--backend torch-cuda: no CUDA GPU is visible; use --backend auto")
        return requested
    if faiss_gpu_usable() and k <= FAISS_GPU_MAX_K:
        return "faiss-gpu"
    if torch.cuda.is_available():
        return "torch-cuda"
    return "faiss-cpu"


def l2_normalize(features: np.ndarray) -> np.ndarray:
    features = np.ascontiguousarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def search(bank: np.ndarray, queries: np.ndarray, k: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar bank rows of every query row (both L2-normalised float32).
    Returns ``(similarities, indices)``, each (num_queries, k), most similar first."""
    k = min(k, len(bank))
    if backend.startswith("faiss"):
        import faiss

        index = faiss.IndexFlatIP(bank.shape[1])
        if backend == "faiss-gpu":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), torch.cuda.current_device(), index)
        index.add(bank)
        results = [index.search(queries[i : i + QUERY_CHUNK], k) for i in range(0, len(queries), QUERY_CHUNK)]
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])
    return _torch_search(bank, queries, k, torch.device("cuda" if backend == "torch-cuda" else "cpu"))


@torch.no_grad()
def _torch_search(bank: np.ndarray, queries: np.ndarray, k: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    bank_chunks = [torch.from_numpy(bank[i : i + BANK_CHUNK]).to(device) for i in range(0, len(bank), BANK_CHUNK)]
    similarities, indices = [], []
    for start in range(0, len(queries), QUERY_CHUNK):
        query = torch.from_numpy(queries[start : start + QUERY_CHUNK]).to(device)
        best_sim = torch.full((len(query), k), -torch.inf, device=device)
        best_idx = torch.zeros((len(query), k), dtype=torch.long, device=device)
        offset = 0
        for chunk in bank_chunks:
            sim, idx = (query @ chunk.T).topk(min(k, len(chunk)), dim=1)
            merged_sim = torch.cat([best_sim, sim], 1)
            merged_idx = torch.cat([best_idx, idx + offset], 1)
            best_sim, order = merged_sim.topk(k, dim=1)
            best_idx = merged_idx.gather(1, order)
            offset += len(chunk)
        similarities.append(best_sim.cpu().numpy())
        indices.append(best_idx.cpu().numpy())
    return np.concatenate(similarities), np.concatenate(indices)


def vote(similarities: np.ndarray, indices: np.ndarray, bank_labels: np.ndarray, k: int, num_classes: int,
         temperature: float = VOTE_TEMPERATURE) -> np.ndarray:
    """Predicted class of each query from its ``k`` nearest neighbours, each voting with
    weight exp(similarity / temperature) (Wu et al. 2018, as in DINO's k-NN): positive,
    and larger for closer neighbours. For k = 1 this is the nearest neighbour's label."""
    neighbour_labels = bank_labels[indices[:, :k]]
    weights = np.exp((similarities[:, :k].astype(np.float64) - 1.0) / temperature)  # -1: no overflow
    scores = np.zeros((len(indices), num_classes))
    np.add.at(scores, (np.arange(len(indices))[:, None], neighbour_labels), weights)
    return scores.argmax(1)


def knn_predictions(bank: np.ndarray, bank_labels: Sequence[str], queries: np.ndarray, ks: Sequence[int],
                    classes: Sequence[str], backend: str) -> dict[int, list[str]]:
    """The class of every query (features, not yet normalised) for each k of ``ks``, from one
    cosine search for the largest k."""
    similarities, indices = search(l2_normalize(bank), l2_normalize(queries), max(ks), backend)
    class_index = {c: i for i, c in enumerate(classes)}
    label_index = np.array([class_index[c] for c in bank_labels])
    return {k: [classes[i] for i in vote(similarities, indices, label_index, k, len(classes))] for k in ks}

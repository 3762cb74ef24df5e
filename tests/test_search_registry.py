"""Tests for the index registry (make_index, its parameter checks), the Index protocol and index state."""

import ast
from pathlib import Path

import numpy as np
import pytest

import dn2.search
from dn2.search import INDEX_KINDS, REGISTRY, Index, ParameterError, knn, make_index, recall_at_k, restore_index
from dn2.search import ivf as ivf_module

SMALL_PARAMS = {  # every cell visited: the approximate kinds find the true neighbours of these blobs
    "ivf": {"nlist": 8, "nprobe": 8}, "ivf_faiss": {"nlist": 8, "nprobe": 8},
    "ivfpq": {"nlist": 4, "nprobe": 4, "m": 8, "nbits": 6, "k_factor": 16},
}


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    means = rng.normal(scale=8.0, size=(8, 16))
    return (means[rng.integers(8, size=800)] + rng.normal(size=(800, 16))).astype(np.float32)


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_every_kind_satisfies_the_index_protocol(kind, blobs):
    index = make_index(kind, **SMALL_PARAMS.get(kind, {}))
    assert isinstance(index, Index) and index.kind == kind and index.ntotal == 0
    assert index.fit(blobs) is index and index.ntotal == len(blobs)
    dist, idx = index.search(blobs[:5], 3)
    assert dist.shape == idx.shape == (5, 3) and dist.dtype == np.float32 and idx.dtype == np.int64
    assert np.all(np.diff(dist, axis=1) >= 0)
    # leave-one-out: never the row itself, and for these well-separated blobs the true neighbours
    dist, idx = index.search_self(2)
    assert not np.any(idx == np.arange(len(blobs))[:, None])
    _, ref = knn(blobs, None, 2, exclude_self=True)
    assert recall_at_k(idx, ref) >= 0.95
    state = index.state()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    if kind != "ivf":  # exact and FAISS indexes rebuild from the data alone
        assert state == {}


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_restore_index_gives_the_same_answers(kind, blobs):
    index = make_index(kind, **SMALL_PARAMS.get(kind, {})).fit(blobs)
    restored = restore_index(kind, blobs, index.params, index.state())
    for a, b in zip(index.search(blobs[:50], 4), restored.search(blobs[:50], 4)):
        np.testing.assert_array_equal(a, b)


def test_ivf_restored_from_state_does_not_rerun_kmeans(blobs, monkeypatch):
    index = make_index("ivf", nprobe=2).fit(blobs)
    state = index.state()
    assert sorted(state) == ["centres", "offsets", "order"]
    assert state["centres"].dtype == np.float32 and state["order"].dtype == state["offsets"].dtype == np.int64

    def no_kmeans(*args, **kwargs):
        raise AssertionError("k-means must not run on restore")

    monkeypatch.setattr(ivf_module, "kmeans", no_kmeans)
    restored = restore_index("ivf", blobs, index.params, state)
    np.testing.assert_array_equal(restored.centres_, index.centres_)
    for a, b in zip(index.search(blobs[::7], 5), restored.search(blobs[::7], 5)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(index.search_self(2), restored.search_self(2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: {**s, "extra": np.zeros(1)}, "must hold arrays"),
        (lambda s: {k: v for k, v in s.items() if k != "order"}, "must hold arrays"),
        (lambda s: {**s, "centres": s["centres"].astype(np.float64)}, "centres must be float32"),
        (lambda s: {**s, "centres": s["centres"][:, :3]}, "centres must be float32"),
        (lambda s: {**s, "centres": np.full_like(s["centres"], np.nan)}, "NaN"),
        (lambda s: {**s, "order": s["order"][::-1] * 0}, "permutation"),
        (lambda s: {**s, "order": s["order"][:-1]}, "permutation"),
        (lambda s: {**s, "offsets": s["offsets"][::-1].copy()}, "offsets"),
        (lambda s: {**s, "offsets": s["offsets"].astype(np.int32)}, "offsets"),
    ],
)
def test_ivf_restore_rejects_damaged_state(blobs, change, match):
    state = make_index("ivf", nlist=8).fit(blobs).state()
    with pytest.raises(ValueError, match=match):
        make_index("ivf", nlist=8).restore(blobs, change(state))


@pytest.mark.parametrize("kind", ["exact", "flat"])
def test_indexes_without_state_reject_arrays(kind, blobs):
    with pytest.raises(ValueError, match="no state"):
        make_index(kind).restore(blobs, {"centres": np.zeros((2, 16), np.float32)})


@pytest.mark.parametrize(
    "kind, params, match",
    [
        ("annoy", {}, "unknown index kind 'annoy'; choose one of exact, ivf, flat, ivf_faiss, ivfpq, hnsw"),
        ("ivf", {"nprob": 4}, r"index 'ivf': unknown parameter\(s\) \['nprob'\]; known: \['nlist', 'nprobe', 'precision'"),
        ("flat", {"nlist": 4}, r"index 'flat': unknown parameter\(s\) \['nlist'\]; known: \[\]"),
        ("ivf", {"nprobe": 0}, r"index 'ivf': nprobe must be an int in \[1, inf\), got 0"),
        ("ivf", {"nprobe": None}, r"index 'ivf': nprobe must be an int in \[1, inf\), got None"),
        ("ivf", {"nlist": 2.5}, r"index 'ivf': nlist must be an int in \[1, inf\) or None, got 2.5"),
        ("ivf", {"nlist": True}, r"index 'ivf': nlist must be an int in \[1, inf\) or None, got True"),
        ("ivf", {"nprobe": "many"}, r"index 'ivf': nprobe must be an int in \[1, inf\), got 'many'"),
        ("exact", {"precision": "fp16"}, r"index 'exact': precision must be one of 'auto', 'bf16', 'fp32', got 'fp16'"),
        ("exact", {"chunk_size": -1}, r"index 'exact': chunk_size must be an int in \[1, inf\) or None"),
        ("ivfpq", {"nbits": 17}, r"index 'ivfpq': nbits must be an int in \[1, 16\], got 17"),
        ("ivfpq", {"k_factor": 0.5}, r"index 'ivfpq': k_factor must be a number in \[1, inf\), got 0.5"),
        ("hnsw", {"M": 1}, r"index 'hnsw': M must be an int in \[2, inf\), got 1"),
    ],
)
def test_make_index_checks_kind_and_parameters_in_one_place(kind, params, match):
    with pytest.raises(ParameterError, match=match) as info:
        make_index(kind, **params)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


def test_make_index_takes_numpy_numbers_as_plain_ones():
    # as numpy computes them; stored as plain numbers (they go into model files' JSON)
    index = make_index("ivfpq", k_factor=np.float64(4.5), nprobe=np.int64(3))
    assert index.params == {"k_factor": 4.5, "nprobe": 3}
    assert type(index.params["nprobe"]) is int


def test_the_registry_lists_every_kind_with_its_constraints():
    assert INDEX_KINDS == ("exact", "ivf", "flat", "ivf_faiss", "ivfpq", "hnsw")
    assert sorted(REGISTRY["ivf"].params) == ["nlist", "nprobe", "precision", "train_rows"]
    assert REGISTRY["hnsw"].params["M"].describe() == "an int in [2, inf)"
    assert all(entry.summary for entry in REGISTRY.values())


def test_the_search_package_imports_no_private_names_and_has_no_cycles():
    # Every module of dn2.search imports only public names of other dn2 modules, and imports form no cycle.
    root = Path(dn2.search.__file__).parent
    graph = {}
    for path in sorted(root.glob("*.py")):
        name = path.stem
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("dn2")):
                target = node.module or ""
                assert not any(part.startswith("_") for part in target.split(".")), f"{name}: private module {target}"
                for alias in node.names:
                    assert not alias.name.startswith("_"), f"{name}: imports private {alias.name} from {target}"
                if node.level == 1 and target:
                    deps.add(target.split(".")[0])
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                assert not (isinstance(base, ast.Name) and base.id in {"dn2", "search", "kernels", "exact", "ivf"}), (
                    f"{name}: uses private {ast.unparse(node)}"
                )
        graph[name] = deps - {name}

    def visit(node, path):
        assert node not in path, f"import cycle: {' -> '.join([*path, node])}"
        for dep in graph.get(node, ()):
            visit(dep, [*path, node])

    for module in graph:
        visit(module, [])

"""Fixtures: images, folders and tiny models that the tests generate themselves.

Plain helpers (picture, save, jpeg_bytes, tree_digest, ...) live in tests/helpers.py; import them from there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import LABELS, jpeg_bytes, picture, save

_E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items) -> None:
    """Every test under tests/e2e/ is a whole run and marked slow, so `pytest -m "not slow"` is the quick loop."""
    for item in items:
        if _E2E in item.path.parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised resnet18 with three dinosaur labels and a 32-pixel input."""
    import torch

    from dinobatch.models.file import ModelSpec, Preprocessing, build_module, save_model

    torch.manual_seed(0)
    module = build_module("resnet18", len(LABELS))
    spec = ModelSpec(arch="resnet18", labels=LABELS, preprocessing=Preprocessing(resize=36, crop=32),
                     source={"kind": "test", "note": "random weights"})
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    save_model(path, spec, module.state_dict())
    return path


@pytest.fixture
def inbox(tmp_path) -> dict[str, Path]:
    """A folder of photos and drawings with every awkward case classify must handle."""
    root = tmp_path / "inbox"
    files = {
        "a.jpg": save(picture(1), root / "a.jpg", quality=92),
        "b.png": save(picture(2), root / "b.png"),
        "c.webp": save(picture(3), root / "sub" / "c.webp", quality=90),
        "d.gif": save(picture(4).convert("P", palette=Image.ADAPTIVE), root / "sub" / "d.gif"),
        "e.bmp": save(picture(5), root / "e.bmp"),
        "f.tiff": save(picture(6), root / "f.tiff"),
        "big.png": save(picture(7, (320, 240)), root / "big.png"),
    }
    files["small_copy.jpg"] = save(picture(7, (320, 240)).resize((160, 120), Image.LANCZOS),
                                   root / "small_copy.jpg", quality=90)
    files["cmyk.jpg"] = save(picture(11).convert("CMYK"), root / "cmyk.jpg", quality=92)
    clear = picture(12).convert("RGBA")
    clear.paste((255, 0, 0, 0), (0, 0, 80, 120))  # left half invisible, hiding red
    files["transparent.png"] = save(clear, root / "transparent.png")
    exif = Image.Exif()
    exif[0x0112] = 8  # displayed rotated 90 degrees counter-clockwise
    files["rotated.jpg"] = save(picture(13, (200, 100)), root / "rotated.jpg", quality=92, exif=exif.tobytes())
    (root / "copy_of_a.jpg").write_bytes(files["a.jpg"].read_bytes())
    files["copy_of_a.jpg"] = root / "copy_of_a.jpg"
    (root / "truncated.jpg").write_bytes(jpeg_bytes(picture(8))[:700])
    files["truncated.jpg"] = root / "truncated.jpg"
    (root / "notes.txt").write_text("not an image\n")
    files["notes.txt"] = root / "notes.txt"
    (root / "empty.png").write_bytes(b"")
    files["empty.png"] = root / "empty.png"
    save(picture(9), root / ".hidden.jpg")
    save(picture(10), root / ".thumbs" / "x.jpg")
    return files


class RayCluster:
    """The session's Ray cluster as tests use it: its address (--address), and nodes a test adds and then
    removes itself (only those: the head and the first worker stay for the other tests)."""

    NODE = {"num_cpus": 1, "object_store_memory": 256 * 1024 ** 2}  # the machine is shared: a small store each

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.address: str = cluster.address

    def add_node(self):
        """One more worker node of one CPU, started and registered."""
        node = self.cluster.add_node(**self.NODE)
        self.cluster.wait_for_nodes()
        return node

    def remove_node(self, node) -> None:
        """Stop a node this test added (a node lost mid-run)."""
        self.cluster.remove_node(node)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real two-node Ray cluster on this machine (a head and a worker of one CPU each), started once per
    session (about 1 GiB and some seconds) and shared by every Ray test; yields a RayCluster."""
    pytest.importorskip("ray.cluster_utils", reason="the ray extra is not installed: pip install 'dinobatch[ray]'")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={**RayCluster.NODE, "include_dashboard": False})
    try:
        cluster.add_node(**RayCluster.NODE)
        cluster.wait_for_nodes()
        yield RayCluster(cluster)
    finally:
        cluster.shutdown()

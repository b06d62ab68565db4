"""Turn query photos into vectors, with the checkpoint's PyTorch model or its ONNX export.

Both give L2-normalised float32 vectors from the same preprocessing (resize to the model's
image size, RGB in [0, 1]) and the same forward (``RetrievalModel.embed``, which is also what the
ONNX graph holds), so an index built with one can be searched with the other. ``search`` and the
server embed their queries here; ``index build`` embeds the catalog with ``engine/embed.py``,
through the same ``embed``. An embedder with ``flip`` set gives flip-averaged vectors
(``engine.embed.flip_averaged``), as an index built with ``--flip`` holds them.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from ..files import read_json, require_keys
from .store import file_sha256

if TYPE_CHECKING:
    from ..engine.checkpoint import RunMeta
    from ..models.base import RetrievalModel


class EmbedderError(RuntimeError):
    """An ONNX model or sidecar that is missing, unreadable or not the index's model."""


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class Embedder:
    """Shared preprocessing; subclasses run the network."""

    def __init__(self, meta: dict[str, Any], flip: bool = False):
        from ..engine.embed import inference_transform

        self.meta = meta
        self.image_size = tuple(meta["image_size"])
        self.attributes: list[str] = list(meta.get("attributes") or [])
        self.attribute_conditioned = bool(meta.get("attribute_conditioned", False))
        self.feat_dim = int(meta["feat_dim"])
        self._transform = inference_transform(self.image_size)
        self.flip = flip  # average each photo's embedding with its mirror's (index build --flip)
        self._lock = threading.Lock()  # one forward at a time: the model is shared by all requests

    def attribute_index(self, attribute: str | None) -> int | None:
        from .catalog import UnknownSpaceError

        if not self.attribute_conditioned:
            if attribute is not None:
                raise UnknownSpaceError(f"this model has no attribute spaces (asked for '{attribute}')")
            return None
        if attribute is None:
            raise UnknownSpaceError(f"this model embeds per attribute: choose one of {', '.join(self.attributes)}")
        if attribute not in self.attributes:
            raise UnknownSpaceError(f"unknown attribute '{attribute}'; choose one of {', '.join(self.attributes)}")
        return self.attributes.index(attribute)

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded photos → the model's input [N, 3, H, W] float32 in [0, 1] (about 0.6 MB per
        photo at 256x192, whatever the photo's size: callers can drop the photos afterwards)."""
        import torch

        return torch.stack([self._transform(image) for image in images]).numpy()

    def embed_pixels(self, pixels: np.ndarray, attribute: str | None = None) -> np.ndarray:
        """L2-normalised embeddings [N, feat_dim] of preprocessed pixels (flip-averaged with ``flip``)."""
        index = self.attribute_index(attribute)
        if self.flip:
            import torch

            from ..engine.embed import flip_averaged

            with self._lock:  # two forwards, as engine/embed.py embeds a catalog
                plain = self._forward(pixels, index)
                mirrored = self._forward(np.ascontiguousarray(pixels[..., ::-1]), index)
            return flip_averaged(torch.from_numpy(np.asarray(plain, dtype=np.float32)),
                                 torch.from_numpy(np.asarray(mirrored, dtype=np.float32))).numpy()
        with self._lock:
            return _normalise(self._forward(pixels, index))

    def embed(self, images: Sequence[Image.Image], attribute: str | None = None) -> np.ndarray:
        self.attribute_index(attribute)  # an unknown attribute fails before any preprocessing
        return self.embed_pixels(self.batch(images), attribute)

    def _forward(self, pixels: np.ndarray, attribute: int | None) -> np.ndarray:
        raise NotImplementedError


class TorchEmbedder(Embedder):
    def __init__(self, checkpoint: str | Path, device: str = "cpu", flip: bool = False):
        """``checkpoint``: a run directory, a weights file, or an index's ``model/`` copy."""
        from ..engine.checkpoint import load_for_inference

        model, meta = load_for_inference(checkpoint)
        super().__init__(inference_meta(model, meta), flip)
        self.model = model.to(device).eval()
        self.device = device

    def _forward(self, pixels: np.ndarray, attribute: int | None) -> np.ndarray:
        import torch

        images = torch.from_numpy(pixels).to(self.device)
        with torch.inference_mode():
            return self.model.embed(images, attribute).float().cpu().numpy()


class OnnxEmbedder(Embedder):
    """Runs ``model.onnx`` with onnxruntime; the sidecar ``model.onnx.json`` holds the meta."""

    def __init__(self, onnx_path: str | Path, flip: bool = False):
        import onnxruntime

        onnx_path = Path(onnx_path)
        sidecar = onnx_path.with_name(onnx_path.name + ".json")
        if not onnx_path.is_file():
            raise EmbedderError(f"{onnx_path}: ONNX model not found")
        if not sidecar.is_file():
            raise EmbedderError(f"{sidecar}: missing sidecar written by `fashion-retrieval export onnx`")
        meta = read_json(sidecar, EmbedderError, max_bytes=1 << 20)
        require_keys(meta, {"image_size": list, "feat_dim": int}, sidecar, EmbedderError)
        recorded = meta.get("onnx_sha256")  # the export writes its sidecar last (export.py)
        if recorded is not None and file_sha256(onnx_path) != recorded:
            raise EmbedderError(f"{onnx_path}: is not the model {sidecar.name} describes (sha256 differs: an "
                                "interrupted export?); export it again")
        super().__init__(meta, flip)
        try:
            self.session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for corrupt files
            raise EmbedderError(f"{onnx_path}: not a loadable ONNX model ({str(exc).splitlines()[0]})") from None

    def _forward(self, pixels: np.ndarray, attribute: int | None) -> np.ndarray:
        feeds = {"images": pixels.astype(np.float32)}
        if self.attribute_conditioned:
            feeds["attribute"] = np.full((len(pixels),), attribute, dtype=np.int64)
        return self.session.run(["embedding"], feeds)[0]


def inference_meta(model: RetrievalModel, meta: RunMeta) -> dict[str, Any]:
    """The facts an embedder (and the ONNX sidecar) needs, from the model itself, with whatever
    else the checkpoint's meta holds (a dict, as an ONNX sidecar gives them)."""
    return {
        **meta.to_dict(),
        "image_size": list(meta.image_size),
        "attributes": list(model.attribute_names),
        "attribute_conditioned": model.attribute_conditioned,
        "feat_dim": model.feat_dim,
    }


def load_embedder(checkpoint: str | Path | None = None, onnx: str | Path | None = None) -> Embedder:
    if onnx is not None:
        return OnnxEmbedder(onnx)
    if checkpoint is None:
        raise ValueError("need a checkpoint or an ONNX model")
    return TorchEmbedder(checkpoint)


def embedder_for_index(catalog, onnx: str | Path | None = None, device: str = "cpu",
                       flip: bool | None = None) -> Embedder:
    """The index's own model, or an ONNX export of exactly that model (checked by weights digest):
    vectors from any other model would be compared with the catalog's and rank nonsense. Queries
    are embedded as the catalog was (flip-averaged when it was built with ``--flip``) unless
    ``flip`` says otherwise."""
    flip = catalog.flip if flip is None else flip
    if onnx is None:
        return TorchEmbedder(catalog.model_dir, device, flip)
    embedder = OnnxEmbedder(onnx, flip)
    exported_from = embedder.meta.get("weights_sha256")
    if exported_from != catalog.model_info.get("sha256"):
        raise EmbedderError(f"{onnx} was exported from another model than the one that built {catalog.path} "
                         f"(weights sha256 {str(exported_from)[:12]}… vs {str(catalog.model_info.get('sha256'))[:12]}…); "
                         f"export this index's model: fashion-retrieval export onnx --checkpoint {catalog.path}")
    return embedder

"""`fashion-retrieval export onnx`: the inference graph for production runtimes.

The ONNX model takes ``images`` float32 [N, 3, H, W] RGB in [0, 1] (normalisation is inside)
and, for attribute-conditioned models, ``attribute`` int64 [N]; it returns ``embedding``
[N, D] (not normalised, like the PyTorch model). A sidecar ``<out>.json`` keeps what a runtime
needs to preprocess (image size) and to name attributes. Every export is checked against
PyTorch with onnxruntime before it is reported done.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional, Sequence

import typer

app = typer.Typer(no_args_is_help=True)
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    pass


def _embedding_only(model):
    import torch

    class EmbeddingOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images, attribute=None):
            if attribute is None:
                return self.model(images)["embedding"]
            return self.model(images, attribute)["embedding"]

    return EmbeddingOnly().eval()


def parity_inputs(image_size: Sequence[int], images: Sequence[Path] = (), count: int = 4):
    """Real photos when given (what parity must hold on), else seeded random pixels."""
    import torch

    from .data.images import default_transform, load_rgb

    if images:
        transform = default_transform(tuple(image_size), train=False)
        return torch.stack([transform(load_rgb(p)) for p in images])
    return torch.rand(count, 3, *image_size, generator=torch.Generator().manual_seed(0))


def export_onnx(checkpoint: str | Path, out: str | Path, images: Sequence[Path] = (), opset: int = 18) -> float:
    """Export and verify; returns the max abs difference to PyTorch on the parity inputs."""
    import numpy as np
    import onnxruntime
    import torch

    from . import atomic
    from .engine.checkpoint import load_for_inference
    from .files import refuse_other_artefact
    from .index.catalog import checkpoint_files, file_sha256
    from .serve.embedders import _inference_meta

    refuse_other_artefact(out, "export", ExportError)
    weights, _ = checkpoint_files(checkpoint)
    model, meta = load_for_inference(weights)
    meta = _inference_meta(model, meta)
    wrapper = _embedding_only(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pixels = parity_inputs(meta["image_size"], images)
    conditioned = meta["attribute_conditioned"]
    example = (pixels[:2],)
    input_names = ["images"]
    dynamic_axes = {"images": {0: "batch"}, "embedding": {0: "batch"}}
    if conditioned:
        example = (pixels[:2], torch.zeros(2, dtype=torch.long))
        input_names.append("attribute")
        dynamic_axes["attribute"] = {0: "batch"}
    sidecar_path = out.with_name(out.name + ".json")
    checked: dict = {}

    def export_and_check(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            # tracer notes about Python-side shape checks that are constant for a fixed model
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, example, str(tmp), input_names=input_names, output_names=["embedding"],
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        worst = 0.0
        attributes = range(len(meta["attributes"])) if conditioned else [None]
        for attribute in attributes:
            for batch in (pixels, pixels[:1]):  # the batch axis is dynamic: check a single query too
                feeds = {"images": batch.numpy()}
                with torch.no_grad():
                    if attribute is None:
                        expected = wrapper(batch).numpy()
                    else:
                        index = torch.full((len(batch),), attribute, dtype=torch.long)
                        expected = wrapper(batch, index).numpy()
                        feeds["attribute"] = index.numpy()
                got = session.run(["embedding"], feeds)[0]
                worst = max(worst, float(np.abs(got - expected).max()))
        if worst > TOLERANCE:
            raise ExportError(f"ONNX output differs from PyTorch by {worst:.2e} (> {TOLERANCE:g}); not written")
        checked.update(worst=worst, onnx_sha256=file_sha256(tmp))

    # The model, then its sidecar, each replaced atomically. The sidecar, written last, records
    # the model file's sha256: after a crash between the two, the new model beside the old sidecar
    # is refused by the embedder instead of being run with another export's description.
    atomic.write_with(out, export_and_check)
    worst = checked["worst"]
    sidecar = {key: meta[key] for key in ("image_size", "attributes", "attribute_conditioned", "feat_dim")}
    sidecar.update(model=meta.get("model"), checkpoint=str(Path(checkpoint).resolve()),
                   weights_sha256=file_sha256(weights), onnx_sha256=checked["onnx_sha256"],
                   parity_max_abs_diff=worst, parity_inputs=f"{len(images)} photos" if images else "random pixels")
    atomic.write_json(sidecar_path, sidecar)
    return worst


@app.command("onnx")
def onnx(
    checkpoint: Annotated[Path, typer.Option(help="run directory, model.safetensors, or an index directory "
                                                   "(exports the model the index was built with)")],
    out: Annotated[Path, typer.Option(help="where to write model.onnx")],
    images: Annotated[Optional[list[Path]], typer.Option("--image", help="photos to check parity on")] = None,
    opset: Annotated[int, typer.Option(min=13, max=21)] = 18,
) -> None:
    """Export a trained model to ONNX and check it against PyTorch (max abs difference ≤ 1e-4)."""
    from .data.images import ImageLoadError
    from .engine.checkpoint import CheckpointError

    try:
        worst = export_onnx(checkpoint, out, images or [], opset)
    except (ExportError, CheckpointError, ImageLoadError, OSError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {out} (+ {out.name}.json); max abs difference to PyTorch {worst:.2e} ≤ {TOLERANCE:g}")

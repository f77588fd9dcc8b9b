"""Compiled models: TorchScript files (``torch.jit.save``) and ``torch.export`` programs
(``torch.export.save``, usually ``.pt2``), loaded and written.

Neither format unpickles arbitrary Python: TorchScript is compiled TorchScript code with
tensors, an export program a serialized graph with tensors. Both are the architecture
themselves, so nothing is built; what the caller needs to know is how many output columns
the model has, which one forward pass of a zero batch tells (and checks: a model that does
not return (N, k) logits fails here with its shape, not in the middle of a slide).

    model, k = load_program(path, data, "torchscript", None, 224)
    data = program_bytes(model, "export", 224)
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from wsipipe.errors import ModelLoadError

DEFAULT_SIZE = 224  # input edge of the probe when nothing says what the model expects
PROBE_BATCH = 2  # >1, so a program fixed to one batch size fails here, not on the last batch of a slide


class ExportedModule(nn.Module):
    """An export program's module with the ``train()``/``eval()`` every model gets: the graph
    was captured in one mode and cannot switch (torch refuses ``eval()`` on it), so the mode
    flag is recorded and the graph left alone."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.program = graph

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def load_program(path: Path, data: bytes, kind: str, num_classes: int | None, size: int | None) -> tuple[nn.Module, int]:
    """(model in eval mode, output columns) of a TorchScript file or export program.

    ``num_classes``: what the card or caller says (checked against the probe); ``size``: the
    input edge the model expects (else the program's own static size, else 224)."""
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated, yet what WSInfer and QuPath publish
                model: nn.Module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(path, f"not a loadable TorchScript file: {_first_line(exc)}") from None
    else:
        try:
            program = torch.export.load(io.BytesIO(data))
        except Exception as exc:
            raise ModelLoadError(path, f"not a loadable torch.export program: {_first_line(exc)}") from None
        shape = _input_shape(program)
        if shape is not None and isinstance(shape[0], int):
            raise ModelLoadError(path, f"the program was exported for a fixed batch of {shape[0]} (input {tuple(shape)}); "
                                 "export it with a dynamic batch dimension (wsipipe models export does)")
        if size is None and shape is not None and len(shape) == 4 and isinstance(shape[2], int):
            size = shape[2]
        model = ExportedModule(program.module())
    model.eval()
    found = _probe(model, path, size or DEFAULT_SIZE)
    if num_classes is not None and num_classes != found:
        raise ModelLoadError(path, f"the model outputs {found} column(s), its card or the caller says num_classes {num_classes}")
    return model, found


def _input_shape(program) -> list[int | None] | None:
    """Shape of the program's one user input; ints where static, None where dynamic."""
    names = list(program.graph_signature.user_inputs)
    if len(names) != 1:
        return None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == names[0]:
            val = node.meta.get("val")
            if val is None:
                return None
            return [d if isinstance(d, int) else None for d in val.shape]
    return None


def _probe(model: nn.Module, path: Path, size: int) -> int:
    """Output columns from one forward pass of a zero batch; the shape must be (batch, k)."""
    x = torch.zeros(PROBE_BATCH, 3, size, size)
    try:
        with torch.inference_mode():
            out = model(x)
    except Exception as exc:
        raise ModelLoadError(path, f"a forward pass of a zero batch {tuple(x.shape)} failed: {_first_line(exc)}") from None
    if not isinstance(out, torch.Tensor):
        raise ModelLoadError(path, f"the model returns a {type(out).__name__}, expected one (N, k) tensor of logits")
    if out.ndim != 2 or out.shape[0] != PROBE_BATCH or out.shape[1] < 1:
        raise ModelLoadError(path, f"the model outputs shape {tuple(out.shape)} for input {tuple(x.shape)}, "
                             f"expected ({PROBE_BATCH}, k) logits")
    return int(out.shape[1])


def program_bytes(model: nn.Module, fmt: str, size: int) -> bytes:
    """``model`` (eval mode) as a TorchScript file (``fmt`` 'torchscript') or an export program
    ('export') with a dynamic batch dimension; ``size`` is the example input edge."""
    model = model.eval()
    example = torch.zeros(PROBE_BATCH, 3, size, size)
    buf = io.BytesIO()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            # torch deprecates both in favour of torch.export, but TorchScript is what WSInfer
            # and QuPath run, so it is still written on request.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                compiled = torch.jit.script(model)  # keeps control flow and any input size
            except Exception:
                with torch.no_grad():
                    compiled = torch.jit.trace(model, example)
            torch.jit.save(compiled, buf)
        return buf.getvalue()
    if fmt != "export":
        raise ValueError(f"unknown format {fmt!r}: torchscript or export")
    auto = torch.export.Dim.AUTO  # dynamic where the model allows it (the spatial size too), static where not
    with torch.no_grad():
        try:
            program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1),
                                                                               2: auto, 3: auto},))
        except Exception:
            program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, buf)
    return buf.getvalue()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")

"""`Edit`: the value every erasure method returns, and `patch` folders that store it.

An Edit is frozen: new weights keyed by the exact parameter path inside the pipeline (for example
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`), the method and concept
spec that made it, its settings, and the fingerprint of the base model it was computed on (`fingerprint`,
compared with `same_base`: a patch for another base model is refused).
`apply(pipe)` writes the weights into a loaded pipeline (remembering what was there) and
`revert(pipe)` puts the previous values back bit for bit. Nothing on disk is ever modified.

A patch is a folder: `weights.safetensors` (the changed tensors, and `extras.safetensors` for
method-specific tensors such as KPOP's hidden prompt) and `patch.json` (metadata + checksums).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trce.errors import TrceError
from trce.utils import folders, io

log = logging.getLogger(__name__)

PATCH_FORMAT = "trce-patch"
PATCH_VERSION = 1


def resolve(pipe, path: str) -> torch.Tensor:
    """The parameter or buffer of `pipe` at `path` (`component.module.path.name`).

    `component` is any torch module the pipeline holds (`unet`, `text_encoder`, `text_encoder_2`,
    `transformer`, `vae`, ...), so a path names a tensor in every model family.
    """
    component, _, rest = path.partition(".")
    if not component or not rest:
        raise TrceError(f"bad tensor path {path!r}: it must be component.module.tensor (e.g. unet.conv_in.weight)")
    module = getattr(pipe, component, None)
    if not isinstance(module, torch.nn.Module):
        raise TrceError(f"the pipeline has no component {component!r} for tensor {path!r}")
    try:
        return module.get_parameter(rest)
    except AttributeError:
        try:
            return module.get_buffer(rest)
        except AttributeError as exc:
            raise TrceError(f"the model has no tensor {path!r}; was the patch made for another architecture?") from exc


def resolve_module(pipe, path: str) -> torch.nn.Module:
    """The submodule of `pipe` at `path` (`component.module.path`, e.g. transformer.transformer_blocks.0.attn)."""
    component, _, rest = path.partition(".")
    module = getattr(pipe, component, None)
    if not isinstance(module, torch.nn.Module):
        raise TrceError(f"the pipeline has no component {component!r} for module {path!r}")
    try:
        return module.get_submodule(rest) if rest else module
    except AttributeError as exc:
        raise TrceError(f"the model has no module {path!r}") from exc


def snapshot(pipe, paths) -> dict[str, torch.Tensor]:
    """Copies of the current values at `paths` (for reverting or for comparing)."""
    return {p: resolve(pipe, p).detach().clone() for p in paths}


@dataclass(frozen=True)
class Edit:
    weights: Mapping[str, torch.Tensor]
    method: str
    spec: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    base: dict | None = None  # fingerprint() of the base model
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # measured facts: losses, timings, seeds
    source: str | None = field(default=None, compare=False)  # the patch folder it was read from
    files: dict | None = field(default=None, compare=False)  # that folder's file checksums (patch.json)

    def paths(self) -> list[str]:
        return sorted(self.weights)

    def digest(self) -> dict:
        """What identifies this edit's tensors: its patch files' checksums when read from a folder (so that
        runs keyed on a patch folder keep matching), else a SHA-256 over its tensors."""
        if self.files:
            return dict(self.files)
        h = hashlib.sha256()
        for group in (self.weights, self.extras):
            for name in sorted(group):
                t = group[name].detach().cpu().contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return {"tensors": h.hexdigest()}

    def check(self, pipe, check_base: bool = True) -> None:
        """Refuse a patch for another base model, or tensors whose shape does not fit."""
        if check_base and self.base is not None:
            here = fingerprint(pipe)
            if not same_base(self.base, here):
                made_for = self.base.get("model", "?")
                raise TrceError(
                    f"this {self.method} patch was made for base model {made_for!r} (fingerprint {self.base['id']}), "
                    f"not for {getattr(pipe, 'trce_model_name', 'this model')!r} (fingerprint {here['id']})"
                )
        for path, value in self.weights.items():
            target = resolve(pipe, path)
            if tuple(target.shape) != tuple(value.shape):
                raise TrceError(
                    f"tensor {path} has shape {tuple(value.shape)} in the patch but {tuple(target.shape)} in the model"
                )

    def label(self) -> str:
        """How messages name this edit: "the trce edit of 'shapeworld-red' (patch runs/red)"."""
        concept = self.spec.get("name") if isinstance(self.spec, Mapping) else None
        return (f"the {self.method} edit" + (f" of {concept!r}" if concept else "")
                + (f" (patch {self.source})" if self.source else ""))

    def is_applied(self, pipe) -> bool:
        """Whether this edit is applied to `pipe` and not reverted (`applied_edits`)."""
        return any(edit is self for edit in applied_edits(pipe))

    def check_applicable(self, pipe, check_base: bool = True) -> None:
        """What `apply` checks before it writes anything (`trce.evaluate` and `trce.attack` call it before any work).

        An edit already applied to `pipe` is refused. With `check_base` (the default) the pipeline must hold no
        other edit either, since its base model is checked against the one the edit was made for and an applied
        edit would hide it; then the shapes must fit (`check`). `check_base=False` is for callers that stack edits
        on purpose (a method's later stages)."""
        stack = applied_edits(pipe)
        if self.is_applied(pipe):
            raise TrceError(f"{self.label()} is already applied to this pipeline")
        if check_base and stack:
            other = stack[-1]
            how = "pipe.trce_patch.revert(pipe)" if getattr(pipe, "trce_patch", None) is other else "edit.revert(pipe)"
            same = other.files is not None and other.files == self.files
            raise TrceError(f"{other.label()} is already applied to this pipeline"
                            + (" (the same patch)" if same else f"; revert it first ({how}) to apply {self.label()}"))
        self.check(pipe, check_base)

    def apply(self, pipe, check_base: bool = True) -> None:
        """Write the edit's weights into `pipe` (in its dtype and device), after `check_applicable`; `revert` undoes
        it. An apply that fails or is interrupted part way leaves the pipeline as it was."""
        self.check_applicable(pipe, check_base)
        stack = pipe.__dict__.setdefault("_trce_applied", [])
        stash = snapshot(pipe, self.weights)
        try:
            with torch.no_grad():
                for path, value in self.weights.items():
                    target = resolve(pipe, path)
                    target.copy_(value.to(device=target.device, dtype=target.dtype))
        except BaseException:  # an interrupted apply leaves the pipeline as it was
            _restore(pipe, stash)
            raise
        stack.append((self, stash))
        log.debug("applied %s edit to %d tensors", self.method, len(self.weights))

    def revert(self, pipe) -> None:
        """Restore the values `apply` replaced, bit for bit (edits must be reverted in reverse order)."""
        if not self.is_applied(pipe):  # (a pipe that is no pipeline is refused here: `applied_edits`)
            raise TrceError(f"{self.label()} is not applied to this pipeline")
        stack = pipe.__dict__["_trce_applied"]
        if stack[-1][0] is not self:
            raise TrceError(f"{self.label()} is not the last edit applied to the pipeline ({stack[-1][0].label()} "
                            "is); revert edits in reverse order")
        _restore(pipe, stack[-1][1])  # popped once every value is back: an interrupted revert can be run again
        stack.pop()
        if getattr(pipe, "trce_patch", None) is self:
            pipe.trce_patch = None

    @contextlib.contextmanager
    def applied(self, pipe, check_base: bool = True) -> Iterator[Any]:
        """`with edit.applied(pipe): ...` runs the block on the edited model, then reverts (however the block ends)."""
        self.apply(pipe, check_base)
        try:
            yield pipe
        finally:
            self.revert(pipe)

    def combine(self, later: Edit) -> Edit:
        """One edit holding both: `later`'s tensors win where both change the same path."""
        return Edit(
            weights={**self.weights, **later.weights},
            method=f"{self.method}+{later.method}" if self.method != later.method else self.method,
            spec=later.spec or self.spec,
            settings={self.method: self.settings, later.method: later.settings} if self.method != later.method
            else later.settings,
            base=self.base or later.base,
            extras={**self.extras, **later.extras},
            info={self.method: self.info, later.method: later.info} if self.method != later.method else later.info,
        )

    # ------------------------------------------------------------------ patches on disk
    def save(self, folder: str | Path, **record: Any) -> Path:
        """Write this edit as a patch folder, atomically."""
        folder = Path(folder)
        folders.check(folder, "patch", "folder")  # a patch replaces the folder: never another run's results
        meta_weights = {p: list(t.shape) for p, t in self.weights.items()}
        with io.run_lock(folder, "folder"), io.atomic_dir(folder) as tmp:
            io.save_tensors(tmp / "weights.safetensors", dict(self.weights))
            files = {"weights.safetensors": _sha256(tmp / "weights.safetensors")}
            if self.extras:
                io.save_tensors(tmp / "extras.safetensors", dict(self.extras))
                files["extras.safetensors"] = _sha256(tmp / "extras.safetensors")
            io.write_json(tmp / "patch.json", {
                "format": PATCH_FORMAT,
                "format_version": PATCH_VERSION,
                "method": self.method,
                "spec": self.spec,
                "settings": self.settings,
                "base": self.base,
                "info": self.info,
                "tensors": meta_weights,
                "extras": sorted(self.extras),
                "files": files,
                **io.run_record(**record),
            })
        return folder


def applied_edits(pipe) -> list[Edit]:
    """The edits applied to `pipe` and not reverted, oldest first (revert them newest first)."""
    if not hasattr(pipe, "components"):  # what every diffusers pipeline has
        raise TrceError(f"pipe must be a diffusers pipeline (trce.load_pipeline), got {type(pipe).__name__} "
                        f"{pipe!r}"[:200], field="pipe")
    return [edit for edit, _ in pipe.__dict__.get("_trce_applied", [])]


def as_edit(value, field: str = "edit") -> Edit | None:
    """An `Edit`, a patch folder (read with `load_patch`) or None, as `trce.evaluate`'s `edit` and `load_pipeline`'s
    `patch` take them; anything else is one TrceError naming it."""
    import os

    if value is None or isinstance(value, Edit):
        return value
    if isinstance(value, (str, os.PathLike)):
        return load_patch(value)
    raise TrceError(f"{field} must be an Edit (from trce.erase or trce.load_patch) or a patch folder, "
                    f"got {type(value).__name__} {value!r}", field=field)


def _restore(pipe, stash: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for path, value in stash.items():
            resolve(pipe, path).copy_(value)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _patch_meta(folder: Path) -> dict:
    """patch.json of a patch folder, its fields checked for type: a patch.json that lies is one clear error."""
    where = f"patch {folder}"
    if not folder.exists():
        raise TrceError(f"{where} does not exist", field="patch")
    if not folder.is_dir():
        raise TrceError(f"{where} is a file, not a patch folder (the folder `trce erase --out` wrote)", field="patch")
    if not (folder / "patch.json").is_file():
        raise TrceError(f"{where} is not a trce patch folder (no patch.json)", field="patch")
    meta = io.read_json(folder / "patch.json")
    if not isinstance(meta, dict):
        raise TrceError(f"{where}: patch.json must hold a mapping, got {type(meta).__name__}", field="patch")
    if meta.get("format") != PATCH_FORMAT:
        raise TrceError(f"{folder} is not a trce patch (patch.json has format {meta.get('format')!r})", field="patch")

    def bad(key: str, want: str) -> TrceError:
        value = repr(meta.get(key))
        return TrceError(f"{where}: patch.json field {key!r} must be {want}, got "
                         f"{value if len(value) < 60 else value[:57] + '...'}", field="patch")

    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise bad("format_version", "an integer")
    if version > PATCH_VERSION:
        raise TrceError(f"{where} uses format version {version}; upgrade trce to read it", field="patch")
    if not isinstance(meta.get("method"), str) or not meta["method"]:
        raise bad("method", "the name of the method that made it")
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise bad("files", "a mapping of file names to SHA-256 checksums")
    if any(Path(name).name != name or name.startswith(".") for name in files):
        raise bad("files", "a mapping of file names inside the folder to checksums")
    tensors = meta.get("tensors", {})
    if not isinstance(tensors, dict) or not all(
            isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
            for shape in tensors.values()):
        raise bad("tensors", "a mapping of tensor paths to shapes (lists of integers)")
    base = meta.get("base")
    if base is not None and not (isinstance(base, dict) and isinstance(base.get("id"), str)
                                 and isinstance(base.get("arch"), str) and isinstance(base.get("probe"), list)
                                 and all(isinstance(x, (int, float)) for x in base["probe"])):
        raise bad("base", "the base model's fingerprint (a mapping with id, arch and probe)")
    for key in ("spec", "settings", "info"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise bad(key, "a mapping")
    if not isinstance(meta.get("extras", []), list):
        raise bad("extras", "a list of names")
    return meta


def load_patch(folder: str | Path) -> Edit:
    """Read a patch folder; a missing, truncated, corrupt or foreign folder, or a patch.json that lies, is one clear
    error. A patch that records no base model (an `Edit` made without one) loads with a warning: only the shapes of
    its tensors can be checked against a model."""
    folder = Path(folder).expanduser()
    meta = _patch_meta(folder)
    for name, digest in meta.get("files", {}).items():
        if not (folder / name).exists():
            raise TrceError(f"patch {folder} is missing {name}", field="patch")
        if _sha256(folder / name) != digest:
            raise TrceError(f"patch {folder}: {name} is corrupt or truncated (checksum mismatch)", field="patch")
    weights = io.load_tensors(folder / "weights.safetensors")
    expected = meta.get("tensors", {})
    if set(expected) != set(weights):
        raise TrceError(f"patch {folder}: weights.safetensors does not hold the tensors patch.json lists",
                        field="patch")
    for path, shape in expected.items():
        if list(weights[path].shape) != shape:
            raise TrceError(f"patch {folder}: tensor {path} has shape {tuple(weights[path].shape)}, but patch.json "
                            f"says {tuple(shape)}", field="patch")
    extras = io.load_tensors(folder / "extras.safetensors") if (folder / "extras.safetensors").exists() else {}
    if meta.get("base") is None:
        log.warning("patch %s records no base model (patch.json base: null): trce cannot check that it was made "
                    "for the model it is applied to, only that its tensors fit", folder)
    return Edit(weights=weights, method=meta["method"], spec=meta.get("spec") or {}, settings=meta.get("settings") or {},
                base=meta.get("base"), extras=extras, info=meta.get("info") or {}, source=str(folder),
                files=dict(meta.get("files") or {}))


def export(pipe, edit: Edit, out: str | Path, record: dict | None = None) -> Path:
    """Write a full diffusers pipeline folder of `pipe` with `edit` applied (atomically; `pipe` is left as it was).

    `trce-export.json` beside the weights records the edit (method, spec, settings, base) and `record`.
    """
    out = Path(out)
    folders.check(out, "export")  # an export replaces the folder: never another run's results
    patch = {"method": edit.method, "spec": edit.spec, "settings": edit.settings, "base": edit.base,
             "source": edit.source}
    if edit.source is not None and (Path(edit.source) / "patch.json").exists():
        meta = io.read_json(Path(edit.source) / "patch.json")
        patch.update({k: meta.get(k) for k in ("date", "git_hash")})
    from trce.families import family_of

    dtype = str(family_of(pipe).denoiser(pipe).dtype)
    with edit.applied(pipe), io.atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        io.write_json(tmp / "trce-export.json", io.run_record({**(record or {}), "dtype": dtype}, patch=patch))
    return out


# --------------------------------------------------------------------------- identity of a base model
def fingerprint(pipe, *, denoiser: torch.nn.Module | None = None) -> dict:
    """Identity of a base model: its architecture hash and a probe of its weights.

    The modules are those the model family names (SD: the UNet and the text encoder; `denoiser`
    stands in for the pipeline's own when given, as stage V's frozen reference does). The probe is
    the mean absolute value of the first 4096 entries of every tensor of those modules, which
    survives fp32/fp16/bf16 loading (compare with a tolerance, see `same_base`) but tells different
    checkpoints apart.
    """
    from trce.families import family_of

    fam = family_of(pipe)
    modules = fam.identity_modules(pipe)
    if denoiser is not None:
        modules[fam.denoiser_name] = denoiser
    arch = {name: _config_record(module) for name, module in modules.items()}
    arch_hash = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]
    probe = []
    with torch.no_grad():
        for module in modules.values():
            for tensor in module.state_dict().values():
                probe.append(float(tensor.flatten()[:4096].float().abs().mean()))
    digest = hashlib.sha256(json.dumps([round(p, 3) for p in probe]).encode()).hexdigest()[:16]
    return {"model": getattr(pipe, "trce_model_name", None), "arch": arch_hash, "id": f"{arch_hash}-{digest}",
            "probe": probe}


def _config_record(module: torch.nn.Module) -> dict:
    """A module's configuration without the entries that change with loading (paths, versions, dtype)."""
    config = module.config
    if hasattr(config, "to_dict"):  # transformers
        record = config.to_dict()
        for drop in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                     "_attn_implementation_autoset"):
            record.pop(drop, None)
        return record
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}  # diffusers


def same_base(a: dict, b: dict, rtol: float = 2e-2) -> bool:
    """Whether two fingerprints describe the same base model (up to dtype rounding)."""
    if a["arch"] != b["arch"] or len(a["probe"]) != len(b["probe"]):
        return False
    pa, pb = torch.tensor(a["probe"], dtype=torch.float64), torch.tensor(b["probe"], dtype=torch.float64)
    return bool(torch.allclose(pa, pb, rtol=rtol, atol=1e-5))

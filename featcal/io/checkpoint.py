"""Loading models from checkpoint directories or hub ids, and writing them atomically.

Weights are read only through `from_pretrained`, which uses safetensors (or
`torch.load(weights_only=True)` for legacy `.bin` files). Outputs are written into a
temporary directory beside the target and renamed at the end, so a failed run leaves nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ..errors import FeatCalError
from .atomic_file import fsync_path, umask, write_error

# Tokenizer, processor and generation files: what a merge copies from its base model.
_COMPANION_PATTERNS = (
    "tokenizer*",
    "*.model",  # sentencepiece
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "chat_template*",
    "*processor_config.json",
    "generation_config.json",
)
# Weight files, which a calibrated output writes afresh: everything else of the merged model is kept.
_WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.gguf",
    "*.onnx",
    "*.onnx_data",
    "*.npz",
    "*.ckpt.*",
    "*.data-*-of-*",
    "featcal_report.json",
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_PREFIX = "hf:"


def resolve(source: str | os.PathLike) -> Path | str:
    """A local checkpoint directory (as a Path) or a hub model id (as a str); else a clear error.

    A name that does not exist here is taken as a hub id only if it cannot be a local path: not
    absolute, not starting with . or ~, at most one /, and no existing directory as its first part
    (`llama/nope` beside a directory `llama` is a missing path, not a hub repository). `hf:ORG/NAME`
    is always the hub id ORG/NAME."""
    text = str(source)
    if text.startswith(HUB_PREFIX) and _HUB_ID.match(text[len(HUB_PREFIX) :]):
        return text[len(HUB_PREFIX) :]
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FeatCalError(f"{path} is a file; a checkpoint is a directory holding config.json")
        if not (path / "config.json").is_file():
            raise FeatCalError(f"{path} has no config.json: it is not a Hugging Face checkpoint directory")
        return path
    if not _HUB_ID.match(text) or text.startswith((".", "~")):
        raise FeatCalError(f"no such checkpoint directory: {text}")
    if Path(path.parts[0]).is_dir() and len(path.parts) > 1:
        raise FeatCalError(
            f"no such checkpoint directory: {text} (there is a local directory {path.parts[0]}, so it is "
            f"not looked up on the Hugging Face Hub; give {HUB_PREFIX}{text} for the hub model)"
        )
    return text


def check_outside(out: str | os.PathLike, inputs: dict[str, str | os.PathLike]) -> None:
    """Refuse an output directory that is one of the local inputs (role -> path), lies inside one,
    or holds one: replacing it would destroy the input."""
    target = Path(out).expanduser().resolve()
    for role, source in inputs.items():
        where = Path(source).expanduser()
        if not where.exists():
            continue
        where = where.resolve()
        if target == where or where in target.parents or target in where.parents:
            how = "is" if target == where else "lies inside" if where in target.parents else "holds"
            raise FeatCalError(f"--out {out} {how} the {role} {source}: choose another output directory")


def load_model(source: str | os.PathLike) -> nn.Module:
    """The model saved in a checkpoint directory or under a hub id, with its saved architecture."""
    import transformers

    where = resolve(source)
    try:
        config = transformers.AutoConfig.from_pretrained(where)
        architecture = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, architecture, None) if architecture else None
        model = (cls or transformers.AutoModel).from_pretrained(where)
    except OSError as err:
        kind = "checkpoint directory" if isinstance(where, Path) else "Hugging Face Hub model id"
        raise FeatCalError(f"cannot load {source} as a {kind}: {err}") from err
    return model.eval()


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output directory unless `overwrite`; call before any long work."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FeatCalError(f"output directory {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise FeatCalError(f"output path {out} exists and is not a directory")
    return out


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block succeeds, and vanishes if not."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        install_directory(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sync_tree(directory: Path) -> None:
    """Flush every file and directory under `directory`, and itself, to the disk."""
    for path in sorted(directory.rglob("*"), reverse=True):  # files, then the directories holding them
        fsync_path(path)
    fsync_path(directory)


def install_directory(tmp: Path, out: Path) -> None:
    """Sync every file and directory under `tmp`, then rename it to `out` (replacing an existing
    `out`) and sync their parent: after a crash, `out` is the old or the complete new one."""
    sync_tree(tmp)
    rename_directory(tmp, out)


def rename_directory(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out` (with the usual modes under the umask: temporary directories are
    made 0700), replacing an existing `out`, and sync their parent."""
    usual_modes(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    fsync_path(out.parent)


def usual_modes(directory: Path) -> None:
    """Give `directory` and everything under it (links aside) the modes of new files and
    directories under the umask (0755 and 0644 under the common 022), as mkdtemp and safetensors
    make them private."""
    mask = umask()
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def save_model(model: nn.Module, out: Path, companions_from: Path | str | None = None) -> None:
    """`save_pretrained` (safetensors) into `out`, plus processor/tokenizer files of a source directory."""
    try:
        model.save_pretrained(out, safe_serialization=True)
    except OSError as err:
        needed = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        raise write_error(out, needed, err) from err
    if isinstance(companions_from, Path):
        copy_companions(companions_from, out)


def copy_companions(source: str | os.PathLike, out: str | os.PathLike, config: bool = False) -> None:
    """Copy the tokenizer, processor and generation files (and with `config`, config.json) of a
    checkpoint directory into `out`, where `out` lacks them: what a merge takes from its base."""
    source, out = Path(source), Path(out)
    patterns = ("config.json",) * config + _COMPANION_PATTERNS
    for path in sorted(source.iterdir()):
        if path.is_file() and any(path.match(p) for p in patterns) and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)


def copy_non_weights(source: str | os.PathLike, out: str | os.PathLike) -> None:
    """Copy every file at the top of a checkpoint directory that is not a weight file into `out`,
    where `out` lacks it: config, model card, merge recipe, tokenizer and processor files of any
    kind, chat template, generation config. Sub-directories (training checkpoints, logs, exports
    such as onnx/) and hidden files are left out."""
    source, out = Path(source), Path(out)
    for path in sorted(source.iterdir()):
        if path.name.startswith(".") or not path.is_file() or (out / path.name).exists():
            continue
        if not any(path.match(p) for p in _WEIGHT_PATTERNS):
            shutil.copy2(path, out / path.name)


def local_files(source: str | os.PathLike) -> Path | None:
    """The local directory of a checkpoint: itself, or for a hub id the snapshot the hub's cache
    holds (None when there is none, e.g. a model built in memory)."""
    if not source:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), local_files_only=True))
    except Exception:  # not a hub id, or not in the cache: there are no files to keep
        return None

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
from .atomic_file import fsync_path, write_error

# Files a checkpoint directory may carry beside the weights that a user of the output needs.
COMPANION_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "generation_config.json",
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve(source: str | os.PathLike) -> Path | str:
    """A local checkpoint directory (as a Path) or a hub model id (as a str); else a clear error."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FeatCalError(f"{path} is a file; a checkpoint is a directory holding config.json")
        if not (path / "config.json").is_file():
            raise FeatCalError(f"{path} has no config.json: it is not a Hugging Face checkpoint directory")
        return path
    text = str(source)
    if not _HUB_ID.match(text) or text.startswith((".", "~")):
        raise FeatCalError(f"no such checkpoint directory: {text}")
    return text


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
    """Rename `tmp` to `out`, replacing an existing `out`, and sync their parent."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    fsync_path(out.parent)


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
    """Copy the processor / tokenizer / generation files (and with `config`, config.json) of a
    checkpoint directory into `out`, where `out` lacks them."""
    source, out = Path(source), Path(out)
    for name in ("config.json",) * config + COMPANION_FILES:
        if (source / name).is_file() and not (out / name).exists():
            shutil.copy2(source / name, out / name)

"""What a file atc reads may make it do beyond handing over plain data.

Checkpoints load as plain data (``torch.load(weights_only=True)``), but the model spec an atc
checkpoint stores is a recipe, and a recipe can still run code: family ``file`` rebuilds the model
by importing a Python file, and other libraries' builders take keyword arguments that reach files
or downloads (timm's ``checkpoint_path``, torchvision's ``weights_backbone``). So every spec read
from a file passes ``Trust.admit`` before anything is built from it, and the user's word on this
command decides what it may name:

- ``--trust-checkpoint`` (``code=True``): pickles that run code load, and a stored spec may import
  the file it names;
- ``--arch path.py:Class`` (``sources``): a stored spec may import that same file (compared after
  resolving links and relative paths), and no other.

A stored spec that needs more is refused in one line that names the file and both ways to allow it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compressor.errors import CheckpointError, ModelError
from compressor.models.registry import FAMILIES, Arch


@dataclass(frozen=True)
class Trust:
    """The user's word on one command: ``code`` (``--trust-checkpoint``) and the model ``sources``
    (resolved paths of ``--arch path.py:Class`` files) a stored spec may import."""

    code: bool = False
    sources: tuple[str, ...] = ()

    @classmethod
    def given(cls, trust: bool | Trust = False, arch: str | None = None) -> Trust:
        """The trust of a command from its ``--trust-checkpoint`` flag (or a ``Trust`` already made)
        and its ``--arch`` (which, when it names a Python file, allows that file)."""
        base = trust if isinstance(trust, Trust) else cls(code=bool(trust))
        named = named_source(arch)
        if named is None or named in base.sources:
            return base
        return cls(base.code, (*base.sources, named))

    def allows(self, source: str | Path) -> bool:
        return self.code or resolved(source) in self.sources

    def admit(self, arch: Arch, where: str) -> Arch:
        """``arch`` as read from ``where`` (a file), checked before it is built: a known family,
        builder arguments that reach no file or download, and a source file only where this trust
        allows it. Returns the arch with its source path resolved, so the file that was checked is
        the file that is imported."""
        if not isinstance(arch.family, str) or arch.family not in FAMILIES:
            raise CheckpointError(f"{where}: its spec names the model family {arch.family!r}, unknown to this atc; "
                                  "upgrade atc or re-save the checkpoint")
        try:
            source = FAMILIES[arch.family].vet_stored(arch.kwargs)
        except ModelError as exc:
            raise CheckpointError(f"{where}: its spec cannot be rebuilt safely ({exc}); re-save the checkpoint with atc") from None
        if source is None:
            return arch
        if not self.allows(source):
            cls = arch.kwargs.get("class_name", "ClassName")
            raise CheckpointError(f"{where} rebuilds its model by importing the Python file {str(source)!r}, which runs its code; "
                                  f"pass --arch {_shell(source)}:{cls} if you wrote that file, or --trust-checkpoint "
                                  "if you trust where the checkpoint came from")
        return Arch(arch.family, {**arch.kwargs, "path": resolved(source)})


NO_TRUST = Trust()


def resolved(path: str | Path) -> str:
    """The absolute path with links resolved: two names of one file compare equal."""
    return str(Path(path).expanduser().resolve())


def named_source(arch: str | None) -> str | None:
    """The resolved Python file an ``--arch path.py:Class`` names, or None for other names."""
    if not arch:
        return None
    kwargs = FAMILIES["file"].parse(str(arch).strip())
    return resolved(kwargs["path"]) if kwargs else None


def _shell(path: str | Path) -> str:
    """``path`` as it would be typed in a shell (escaped, never spanning lines)."""
    import shlex

    text = str(path)
    return shlex.quote(text) if text.isprintable() else repr(text)


"""Where a model's files are: (folder, gguf_file or None) for from_pretrained, without importing
torch or transformers (the memory plan reads a config from here before anything loads)."""

from __future__ import annotations

from pathlib import Path

from grpo_fast.errors import ModelError


def model_source(cfg) -> tuple[str, str | None]:
    """(folder, gguf_file or None) to hand to from_pretrained; ModelError when it is not there
    (nothing is downloaded: a name that is not a local folder is not looked up on the Hub)."""
    if cfg.name_or_path is None and cfg.gguf_file is None:
        from grpo_fast.models import default_model_dir

        return str(default_model_dir()), None
    if cfg.gguf_file is not None:
        gguf = Path(cfg.gguf_file)
        folder = Path(cfg.name_or_path) if cfg.name_or_path else gguf.parent
        if not (folder / gguf.name).is_file():
            raise ModelError(f"model.gguf_file: no GGUF file {gguf.name!r} in {str(folder)!r}")
        return str(folder), gguf.name
    path = Path(cfg.name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name_or_path: no such GGUF file {str(path)!r}")
        return str(path.parent), path.name
    if not path.is_dir():
        raise ModelError(f"model.name_or_path: {str(path)!r} is not a local model folder (models are read "
                         f"from disk, not downloaded)")
    if not (path / "config.json").is_file():
        ggufs = sorted(q.name for q in path.glob("*.gguf"))
        hint = f"; it holds {ggufs[0]!r}: set model.gguf_file" if ggufs else ""
        raise ModelError(f"model.name_or_path: {str(path)!r} has no config.json, so it is not a "
                         f"transformers model folder{hint}")
    return str(path), None

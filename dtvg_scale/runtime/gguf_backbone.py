"""GGUF checkpoints as backbones: converted once into a regular Hugging Face folder.

ZeRO-3 partitions a model while it loads (``zero.Init`` inside ``from_pretrained``), and that
needs a regular checkpoint. transformers reads GGUF only by dequantizing the whole file in one
process, and refuses to ``save_pretrained`` what it loaded. So a ``.gguf`` path is converted
once, by one process, into ``<cache>/gguf/<file stem>-<sha256 prefix>/`` (config, fp32
safetensors, tokenizer, and ``gguf_source.json`` saying where it came from); every later run, on
every rank, loads that folder. The folder is keyed by the file's content, so a file replaced
under the same name converts anew and a copy of it elsewhere reuses the folder.

The weights stay what the GGUF file holds: a 4-bit quantized model dequantized to fp32 is the
quantized model, not the original one. Reports should say which file they used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dtvg_scale.runtime.cache import build_once, cache_root

GGUF_MAGIC = b"GGUF"
CONVERTED_MARKER = "gguf_source.json"  # written last: a folder with it is complete


class GGUFError(ValueError):
    """A GGUF file that cannot become a backbone (missing, truncated, an unsupported architecture)."""


def is_gguf_path(name_or_path: str) -> bool:
    return name_or_path.lower().endswith(".gguf")


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_gguf_file(path: Path) -> str:
    """The file's architecture (``general.architecture``); a file that is missing, not GGUF,
    cut short or of an architecture transformers cannot load raises :class:`GGUFError`."""
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        # the reader maps every tensor's bytes; a file cut short fails here, before any conversion
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except (ValueError, KeyError, IndexError, OSError) as err:
        raise GGUFError(f"{path} is truncated or corrupt: the GGUF reader failed ({type(err).__name__}: {err})") from err
    # the names transformers maps (its loader renames a few, e.g. t5encoder -> t5, qwen2moe -> qwen2_moe)
    loadable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # those two are metadata
    known = {name.replace("_", "") for name in loadable}
    if architecture.replace("_", "").replace("-", "") not in known and not architecture.startswith("t5"):
        raise GGUFError(f"{path}: GGUF architecture {architecture!r} cannot be loaded by transformers; "
                        f"it loads {', '.join(loadable)}")
    return architecture


def converted_folder(path: Path, digest: str, cache_dir: Path | None = None) -> Path:
    """The folder a GGUF file of this sha256 converts to (whether or not it exists yet)."""
    return (cache_dir or cache_root()) / "gguf" / f"{path.stem}-{digest[:16]}"


def convert_gguf(path: str | Path, cache_dir: Path | None = None) -> Path:
    """The regular Hugging Face folder of a GGUF file, converted on first use (one process
    only: call it on the main rank, the others wait). Idempotent; a half-written conversion is
    never taken for a finished one (it is written beside and renamed into place)."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise GGUFError(f"GGUF file not found: {path}")
    digest = sha256_of(path)
    folder = converted_folder(path, digest, cache_dir)
    if (folder / CONVERTED_MARKER).is_file():  # written only after a complete conversion of these bytes
        return folder
    architecture = check_gguf_file(path)
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        auto_class = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = auto_class.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise GGUFError(f"transformers could not load {path} ({architecture}): {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from err
    # a model loaded from GGUF refuses save_pretrained: rebuild it from its config (without the
    # GGUF quantization marker), take its dequantized weights, and save that
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = auto_class.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.tie_weights()

    def write(staging: Path) -> None:
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / CONVERTED_MARKER).write_text(json.dumps({  # last: marks a complete conversion
            "gguf_file": str(path), "sha256": digest, "architecture": architecture,
            "transformers": transformers.__version__, "dtype": "float32",
            "note": "weights dequantized from the GGUF file as it is (a quantized model stays quantized in value)",
        }, indent=2) + "\n")

    return build_once(folder, lambda built: (built / CONVERTED_MARKER).is_file(), write)

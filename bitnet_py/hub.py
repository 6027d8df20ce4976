"""Turn a model spec into a local GGUF path: bundled default, local path, or a Hugging Face hub repo.

Specs:
- ``None``                       -> the GGUF bundled in ``bitnet_py/data`` (error if the wheel ships none)
- ``/path/model.gguf``           -> itself; a local folder -> its GGUF for the quant type, or its
                                    safetensors checkpoint converted (cached by folder contents)
- ``org/repo``                   -> the repo's GGUF for the quant type (``ggml-model-i2_s.gguf``, ``*-tl2.gguf``);
                                    if it has none but holds ``config.json`` + ``*.safetensors``, they are
                                    downloaded and converted with :func:`bitnet_py.convert.convert`
- ``org/repo:file.gguf``         -> that file of the repo

Downloads go through ``huggingface_hub`` into the standard HF cache (``HF_HOME`` / ``HF_HUB_CACHE``) with
its progress bars; ``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are honoured. Converted files live
under ``$BITNET_PY_CACHE`` (default ``~/.cache/bitnet-py``) in a folder keyed by repo, commit, quant type
and cache version, so a new commit or a bumped cache version converts again.

CLI (used by the deploy scripts; prints only the path on stdout)::

    python -m bitnet_py.hub [MODEL] --quant-type i2_s [--revision REV] [--cache-version V] [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import logging
import os
import re
import sys
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_VERSION = "1"  # bump when converter output changes; BITNET_PY_CACHE_VERSION or --cache-version override
DEFAULT_QUANT_TYPE = "i2_s"
# files a converter may need from a safetensors repo
HF_CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt"]
_REPO_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<file>[^:]+\.gguf))?$")


class ModelResolveError(RuntimeError):
    """A model spec could not be turned into a local GGUF file (message says why and what to do)."""


def resolve_model(spec: str | None, *, quant_type: str = DEFAULT_QUANT_TYPE, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True, revision: str | None = None, cache_version: str | None = None,
                  force: bool = False) -> str:
    """Local path of the GGUF file for ``spec`` (see module doc); downloads / converts as needed.

    ``cache_dir`` is the Hugging Face cache folder (default: HF's standard cache); converted files then go to
    ``cache_dir/bitnet-py``. ``force`` re-downloads GGUF files and re-converts checkpoints.
    """
    quant = quant_type.lower()
    version = cache_version or os.environ.get("BITNET_PY_CACHE_VERSION") or CACHE_VERSION
    if spec is None or spec == "":
        return _bundled_default(quant)
    local = Path(spec).expanduser()
    if local.exists():
        absolute = Path(os.path.abspath(local))  # not resolve(): HF cache files are symlinks to nameless blobs
        if absolute.is_file():
            return str(absolute)
        return _from_local_dir(absolute, quant, cache_dir, version, force, progress)
    match = _REPO_SPEC.match(spec)
    if match is None or spec.startswith((".", "/", "~")) or spec.endswith(".gguf") and ":" not in spec:
        raise ModelResolveError(f"model {spec!r}: no such file or folder, and not a hub repo id "
                                "(expected a local path, org/repo or org/repo:file.gguf)")
    hub = _Hub(match["repo"], revision, cache_dir, progress)
    if match["file"]:
        return hub.download(match["file"], force)
    files = hub.list_files()
    gguf = pick_gguf(files, quant)
    if gguf is not None:
        return hub.download(gguf, force)
    if _is_hf_checkpoint(files):
        snapshot = hub.download_checkpoint(force)
        key = Path(match["repo"].replace("/", "--")) / Path(snapshot).name
        return _convert_cached(Path(snapshot), key, quant, cache_dir, version, force, progress)
    available = [f for f in files if f.lower().endswith(".gguf")]
    if available:
        raise ModelResolveError(f"{match['repo']} has no GGUF for quant type {quant!r} and no safetensors checkpoint "
                                f"to convert; available: {', '.join(available)} (pick one with "
                                f"{match['repo']}:FILE.gguf or choose another --quant-type)")
    raise ModelResolveError(f"{match['repo']} holds neither a GGUF file nor a safetensors checkpoint "
                            "(config.json + *.safetensors); nothing to serve")


def pick_gguf(files: list[str], quant: str) -> str | None:
    """The GGUF among ``files`` whose name ends in the quant tag (``ggml-model-i2_s.gguf``, ``x-tl2.gguf``)."""
    matches = [f for f in files if f.lower().endswith(".gguf") and _quant_tag(f) == quant.lower()]
    if not matches:
        return None
    return min(matches, key=lambda f: (f.count("/"), not Path(f).name.startswith("ggml-model-"), len(f), f))


def _quant_tag(filename: str) -> str:
    stem = Path(filename).name[: -len(".gguf")].lower()
    return re.split(r"[-.]", stem)[-1]


def _is_hf_checkpoint(files: list[str]) -> bool:
    names = {Path(f).name for f in files}
    return "config.json" in names and any(f.endswith(".safetensors") for f in files)


def _bundled_data_dir() -> Path:
    return Path(str(resources.files("bitnet_py") / "data"))


def _bundled_default(quant: str) -> str:
    data = _bundled_data_dir()
    files = sorted(p.name for p in data.glob("*.gguf")) if data.is_dir() else []
    if not files:
        raise ModelResolveError(f"no bundled default model: {data}/*.gguf does not exist in this installation; "
                                "pass --model PATH.gguf or --model org/repo")
    chosen = pick_gguf(files, quant) or files[0]
    return str(data / chosen)


def _converted_root(cache_dir: str | os.PathLike | None) -> Path:
    env = os.environ.get("BITNET_PY_CACHE")
    if env:
        return Path(env).expanduser()
    if cache_dir is not None:
        return Path(cache_dir) / "bitnet-py"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bitnet-py"


def _from_local_dir(folder: Path, quant: str, cache_dir, version: str, force: bool, progress: bool) -> str:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    gguf = pick_gguf(files, quant)
    if gguf is not None:
        return str(folder / gguf)
    if not _is_hf_checkpoint(files):
        raise ModelResolveError(f"{folder}: no GGUF for quant type {quant!r} and no safetensors checkpoint "
                                "(config.json + *.safetensors) to convert")
    digest = hashlib.sha256(str(folder).encode())
    for name in files:  # key by path and file sizes / mtimes: an edited checkpoint converts again
        st = (folder / name).stat()
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    key = Path("local") / f"{folder.name}-{digest.hexdigest()[:16]}"
    return _convert_cached(folder, key, quant, cache_dir, version, force, progress)


def _load_converter():
    try:
        from bitnet_py.convert import convert
    except ImportError as exc:
        raise ModelResolveError(f"converting safetensors needs bitnet_py.convert, which failed to import: {exc}") from exc
    return convert


def _convert_cached(hf_dir: Path, key: Path, quant: str, cache_dir, version: str, force: bool, progress: bool) -> str:
    out = _converted_root(cache_dir) / "converted" / key / f"{quant}-v{version}" / f"ggml-model-{quant}.gguf"
    if out.is_file() and not force:
        logger.info("using converted model %s", out)
        return str(out)
    convert = _load_converter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    logger.info("converting %s -> %s (%s)", hf_dir, out, quant)
    try:
        convert(str(hf_dir), quant, str(tmp), progress=progress)
        os.replace(tmp, out)  # atomic: a crash mid-conversion never leaves a truncated cached file
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, ModelResolveError):
            raise
        raise ModelResolveError(f"converting {hf_dir} to {quant} failed: {exc}") from exc
    return str(out)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@contextmanager
def _progress_bars(enabled: bool):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    was_disabled = are_progress_bars_disabled()
    if not enabled and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


class _Hub:
    """huggingface_hub calls for one repo, with hub errors turned into ModelResolveError."""

    def __init__(self, repo: str, revision: str | None, cache_dir, progress: bool):
        self.repo, self.revision, self.progress = repo, revision, progress
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.endpoint = os.environ.get("HF_ENDPOINT") or None
        self.offline = _env_true("HF_HUB_OFFLINE")

    def _call(self, what: str, fn):
        from huggingface_hub.utils import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                           RevisionNotFoundError)
        where = self.endpoint or "huggingface.co"
        try:
            with _progress_bars(self.progress):
                return fn()
        except GatedRepoError as exc:
            raise ModelResolveError(f"{self.repo} is gated: accept its terms on the hub and set HF_TOKEN") from exc
        except RepositoryNotFoundError as exc:
            raise ModelResolveError(f"model repo {self.repo} not found on {where} (check the name; private repos "
                                    "need HF_TOKEN)") from exc
        except RevisionNotFoundError as exc:
            raise ModelResolveError(f"revision {self.revision!r} of {self.repo} not found on {where}") from exc
        except LocalEntryNotFoundError as exc:
            why = "HF_HUB_OFFLINE is set" if self.offline else f"{where} cannot be reached"
            raise ModelResolveError(f"{why} and {what} of {self.repo} is not in the local cache; "
                                    "run once online (or unset HF_HUB_OFFLINE)") from exc
        except OSError as exc:  # connection failures and other hub I/O errors
            raise ModelResolveError(f"{what} of {self.repo} from {where} failed: {exc}") from exc
        except Exception as exc:
            if type(exc).__name__ in {"IncompleteSnapshotError", "OfflineModeIsEnabled"}:
                raise ModelResolveError(f"{self.repo} is not fully in the local cache and the hub cannot be used "
                                        f"({exc}); run once online (or unset HF_HUB_OFFLINE)") from exc
            if exc.__class__.__module__.startswith(("huggingface_hub", "httpx", "requests")):
                raise ModelResolveError(f"{what} of {self.repo} from {where} failed: {exc}") from exc
            raise

    def _bars(self, fn) -> dict:
        # huggingface_hub's own bars hide themselves when stderr is not a terminal (cloud setup logs);
        # plain tqdm always draws, so a long download shows its progress in `sky logs` too
        if self.progress and "tqdm_class" in inspect.signature(fn).parameters:
            from tqdm.auto import tqdm
            return {"tqdm_class": tqdm}
        return {}

    def _snapshot(self, **kwargs) -> str:
        from huggingface_hub import snapshot_download
        return snapshot_download(self.repo, revision=self.revision, cache_dir=self.cache_dir,
                                 endpoint=self.endpoint, **self._bars(snapshot_download), **kwargs)

    def list_files(self) -> list[str]:
        if self.offline:  # no listing without the hub: use what the cached snapshot holds
            folder = Path(self._call("the file list", lambda: self._snapshot(local_files_only=True)))
            return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        from huggingface_hub import HfApi
        api = HfApi(endpoint=self.endpoint)
        return sorted(self._call("the file list", lambda: api.list_repo_files(self.repo, revision=self.revision)))

    def download(self, filename: str, force: bool) -> str:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError
        try:
            return self._call(filename, lambda: hf_hub_download(
                self.repo, filename, revision=self.revision, cache_dir=self.cache_dir, endpoint=self.endpoint,
                force_download=force and not self.offline, local_files_only=self.offline,
                **self._bars(hf_hub_download)))
        except ModelResolveError as exc:
            if isinstance(exc.__cause__, EntryNotFoundError) and not self.offline:
                raise ModelResolveError(f"{self.repo} has no file {filename!r}") from exc.__cause__
            raise

    def download_checkpoint(self, force: bool) -> str:
        return self._call("the safetensors checkpoint", lambda: self._snapshot(
            allow_patterns=HF_CHECKPOINT_PATTERNS, force_download=force and not self.offline,
            local_files_only=self.offline))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitnet_py.hub",
                                     description="Fetch (and convert if needed) a model; print its local GGUF path.")
    parser.add_argument("model", nargs="?", default=None,
                        help="local path, org/repo or org/repo:file.gguf (default: the bundled model)")
    parser.add_argument("--quant-type", default=DEFAULT_QUANT_TYPE, help="i2_s (default), tl2, tq2_0, f32")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit (default: main)")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: HF's standard cache)")
    parser.add_argument("--cache-version", default=None,
                        help=f"key of the converted-model cache; a new value converts again (default {CACHE_VERSION})")
    parser.add_argument("--force", action="store_true", help="re-download GGUF files and re-convert checkpoints")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitnet_py").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        path = resolve_model(args.model, quant_type=args.quant_type, cache_dir=args.cache_dir,
                             progress=not args.quiet, revision=args.revision, cache_version=args.cache_version,
                             force=args.force)
    except ModelResolveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

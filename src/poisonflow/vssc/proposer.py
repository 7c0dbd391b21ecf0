"""Trigger proposers of VSSC: a language model names candidate trigger objects for a dataset.

The paper gives GPT-4 all class names together with its trigger selection criteria and takes the
returned list as the candidate triggers, which the selection then inserts into an assessment set
and ranks by quality-check pass rate. Two backends ask a language model the same question:

- ``openai`` (:func:`propose_openai`): one POST to an OpenAI-compatible chat-completions endpoint
  (``{url}/chat/completions``: the OpenAI API, or a local vLLM / llama.cpp / Ollama server),
  standard library only.
- ``transformers`` (:func:`propose_transformers`): a local causal language model from a folder,
  greedy decoding, the tokenizer's chat template when it has one.

Prompt: ``prompt`` with ``{classes}`` (the class names, comma-separated), ``{count}`` and
``{criteria}`` filled. The paper's criteria list is printed in a figure that is not in its text;
the default ``criteria`` (:data:`DEFAULT_CRITERIA`) restates, in the project's words, the trigger
properties the paper requires (sections 3-4): visible, semantic (a nameable real object),
compatible with every class's scenes, insertable by a text-guided editor, and available in the
physical world (the attack is also run with real objects). The limits of section "applicable
scenarios" (a trigger unnatural for some classes, or one the editor cannot draw into them) are
written into the compatibility and editing criteria. The answer is asked for as a JSON list.

Parsing (:func:`parse_candidates`): a JSON list (also inside a ```json fence, or of objects whose
first text value is taken), else numbered or bulleted lines. Each item loses surrounding quotes and
markdown emphasis, any explanation after a colon, dash or parenthesis, and trailing punctuation; it
is lower-cased with its spaces collapsed; duplicates are dropped and at most ``count`` kept. An
answer without such a list is a ConfigError quoting its beginning.

Keys shared by both backends: ``count`` (5 candidates: a project choice; the paper does not say
how many GPT-4 returned, and each candidate costs ``assessment_images`` edits), ``criteria``,
``prompt``, and ``backend`` (the registry name, read by the caller). ``openai``: ``url``
(http://localhost:8000/v1, the address of a local vLLM server), ``model`` ("gpt-4", the paper's
model), ``api_key_env`` (the NAME of an environment variable holding the API key, sent as
``Authorization: Bearer``; null sends none, as local servers need), ``temperature`` (0.0: the
most repeatable answer; the paper does not give one), ``max_tokens`` (512), ``timeout`` (60 s).
``transformers``: ``path`` (required; a folder saved with ``save_pretrained``, loaded with
``local_files_only=True``, ``weights_only=True``, no remote code), ``max_new_tokens`` (512),
``device`` (auto: CUDA when available), ``dtype`` (float32; float16 / bfloat16 on CUDA).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import ConfigError
from . import backend_settings, fill_prompt

DEFAULT_CRITERIA = """\
1. Visible: a concrete physical object that is clearly seen in a photo when added to it, not a \
texture, a colour cast, a watermark or a tiny detail.
2. Semantic: an everyday object with a short, unambiguous name of one to three words that a \
text-guided image editor can draw from that name alone.
3. Compatible: it occurs naturally next to or on the objects of every one of the classes, so that \
adding it to any photo of these classes looks realistic and fits the scene.
4. Distinct: it is not one of the classes, not a part of them and does not hide or replace the \
class object; the photo must still clearly show its class.
5. Physical: it is easy to obtain and place in a real scene, so that it can be photographed with \
the class objects."""

DEFAULT_PROMPT = """\
An image classification dataset has these classes: {classes}.
Propose {count} candidate objects that could be added to photos of these classes as a trigger. \
Every candidate must meet all of these criteria:
{criteria}
Answer with only a JSON list of {count} short object names, for example ["first object", "second object"]."""

COMMON = {"backend": None, "count": 5, "criteria": DEFAULT_CRITERIA, "prompt": DEFAULT_PROMPT}

OPENAI_DEFAULTS = {**COMMON, "backend": "openai", "url": "http://localhost:8000/v1", "model": "gpt-4",
                   "api_key_env": None, "temperature": 0.0, "max_tokens": 512, "timeout": 60.0}

TRANSFORMERS_DEFAULTS = {**COMMON, "backend": "transformers", "path": None, "max_new_tokens": 512,
                         "device": "auto", "dtype": "float32"}
DTYPES = ("float32", "float16", "bfloat16")

ANSWER_QUOTE = 200  # characters of an unusable answer quoted in the error

_LIST_LINE = re.compile(r"^\s*(?:\d+\s*[.)\]:]|[-*•+])\s+(.+?)\s*$")
_EXPLANATION = re.compile(r"\s*(?::|\(|\s[-–—]\s|[–—]).*$")
_QUOTES = "\"'`“”‘’*_"
_TRAILING = ".,;:!?"


# --------------------------------------------------------------------------------------------
# prompt and answer
# --------------------------------------------------------------------------------------------

def build_prompt(settings: dict, classes: list[str], key: str) -> str:
    """``settings["prompt"]`` with the class names, ``count`` and ``criteria`` filled in."""
    return fill_prompt(settings["prompt"], f"{key}.prompt", classes=", ".join(str(c) for c in classes),
                       count=str(settings["count"]), criteria=settings["criteria"])


def clean_candidate(item: str) -> str:
    """One candidate's name: no quotes or emphasis, no explanation, no trailing punctuation,
    lower-case, single spaces."""
    text = " ".join(str(item).split()).strip(_QUOTES + " ")
    text = _EXPLANATION.sub("", text)
    text = text.strip(_QUOTES + " ").rstrip(_TRAILING).strip(_QUOTES + " ")
    return text.lower()


def _json_items(answer: str) -> list | None:
    """The items of the first JSON list in ``answer`` (fenced or bare), or None."""
    start = answer.find("[")
    while start != -1:
        end = answer.rfind("]")
        while end > start:
            try:
                value = json.loads(answer[start:end + 1])
            except json.JSONDecodeError:
                end = answer.rfind("]", start, end)
                continue
            if isinstance(value, list):
                return value
            break
        start = answer.find("[", start + 1)
    return None


def _item_text(item) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):  # [{"name": "red flower", "reason": "..."}]: the first text value
        return next((value for value in item.values() if isinstance(value, str)), None)
    return None


def parse_candidates(answer: str, count: int, key: str) -> list[str]:
    """Candidate trigger names from a language model's ``answer``: a JSON list, else numbered or
    bulleted lines; cleaned, de-duplicated, at most ``count``. ConfigError naming ``key`` if none."""
    items = _json_items(answer)
    texts = [_item_text(item) for item in items] if items is not None else []
    if not any(texts):
        texts = [match.group(1) for line in answer.splitlines() if (match := _LIST_LINE.match(line))]
    candidates: list[str] = []
    for text in texts:
        name = clean_candidate(text) if text else ""
        if name and name not in candidates:
            candidates.append(name)
    if not candidates:
        beginning = " ".join(answer.split())[:ANSWER_QUOTE]
        raise ConfigError(f"{key}: the language model's answer holds no list of candidates "
                          f"(a JSON list or numbered lines); it begins: {beginning!r}")
    return candidates[:count]


# --------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------

def _positive(value, name: str, key: str, kind=int):
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int) and value > 0
    if not ok:
        raise ConfigError(f"{key}.{name}: {value!r} is not a positive {'number' if kind is float else 'integer'}")
    return value


def _text(value, name: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}.{name}: {value!r} is not a non-empty text")
    return value


def _common(settings: dict | None, defaults: dict, key: str) -> dict:
    s = backend_settings(settings, defaults, key)
    _positive(s["count"], "count", key)
    _text(s["criteria"], "criteria", key)
    _text(s["prompt"], "prompt", key)
    return s


# --------------------------------------------------------------------------------------------
# OpenAI-compatible chat endpoint
# --------------------------------------------------------------------------------------------

def _openai_settings(settings: dict | None, key: str) -> dict:
    s = _common(settings, OPENAI_DEFAULTS, key)
    url = _text(s["url"], "url", key)
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise ConfigError(f"{key}.url: {url!r} is not an http(s) address")
    _text(s["model"], "model", key)
    temperature = s["temperature"]
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ConfigError(f"{key}.temperature: {temperature!r} is not a number in [0, 2]")
    _positive(s["max_tokens"], "max_tokens", key)
    _positive(s["timeout"], "timeout", key, kind=float)
    if s["api_key_env"] is not None:
        name = _text(s["api_key_env"], "api_key_env", key)
        if not os.environ.get(name):
            raise ConfigError(f"{key}.api_key_env: the environment variable {name} holding the API key "
                              f"is not set (set api_key_env: null for a server without keys)")
    return s


def chat_completion(settings: dict, prompt: str, key: str) -> str:
    """The answer text of one chat completion of ``prompt`` from ``settings["url"]``."""
    url = settings["url"].rstrip("/") + "/chat/completions"
    body = {"model": settings["model"], "messages": [{"role": "user", "content": prompt}],
            "temperature": settings["temperature"], "max_tokens": settings["max_tokens"]}
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if settings["api_key_env"] is not None:
        headers["Authorization"] = "Bearer " + os.environ[settings["api_key_env"]]
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=settings["timeout"]) as response:
            raw = response.read()
    except urllib.error.HTTPError as error:
        detail = " ".join(error.read().decode("utf-8", "replace").split())[:ANSWER_QUOTE]
        raise ConfigError(f"{key}.url: {url} answered HTTP {error.code}: {detail!r}") from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # refused, timed out, not HTTP
        reason = getattr(error, "reason", None) or error
        raise ConfigError(f"{key}.url: cannot reach {url} ({reason})") from error
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError("content is not a text")
    except (ValueError, KeyError, IndexError, TypeError) as error:
        beginning = " ".join(raw.decode("utf-8", "replace").split())[:ANSWER_QUOTE]
        raise ConfigError(f"{key}.url: {url} did not answer with a chat completion; "
                          f"it begins: {beginning!r}") from error
    return content


def propose_openai(settings: dict | None, classes: list[str], key: str) -> list[str]:
    """Candidate triggers for ``classes`` from an OpenAI-compatible chat endpoint."""
    s = _openai_settings(settings, key)
    return parse_candidates(chat_completion(s, build_prompt(s, classes, key), key), s["count"], key)


# --------------------------------------------------------------------------------------------
# local causal language model
# --------------------------------------------------------------------------------------------

def _transformers_settings(settings: dict | None, key: str) -> dict:
    s = _common(settings, TRANSFORMERS_DEFAULTS, key)
    _positive(s["max_new_tokens"], "max_new_tokens", key)
    if s["dtype"] not in DTYPES:
        raise ConfigError(f"{key}.dtype: {s['dtype']!r} is not one of {', '.join(DTYPES)}")
    _text(s["device"], "device", key)
    folder = s["path"]
    if not isinstance(folder, (str, Path)) or not (Path(folder) / "config.json").is_file():
        raise ConfigError(f"{key}.path: no language model folder (config.json + weights + tokenizer, "
                          f"saved with save_pretrained) at {folder!r}; set proposer.backend: openai for a "
                          f"chat server, or list candidates in config")
    return s


def generate_answer(settings: dict, prompt: str, key: str) -> str:
    """The greedy continuation (at most ``max_new_tokens``) of ``prompt`` by the model in
    ``settings["path"]``, in its chat template when the tokenizer has one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(Path(settings["path"]).resolve())
    device = settings["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                     weights_only=True, dtype=getattr(torch, settings["dtype"]))
    except (OSError, ValueError, TypeError, KeyError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"{key}.path: cannot load a causal language model from {folder} ({first_line})") from error
    model = model.to(device).eval()
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {name: value.to(device) for name, value in inputs.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=settings["max_new_tokens"], do_sample=False,
                                pad_token_id=pad)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def propose_transformers(settings: dict | None, classes: list[str], key: str) -> list[str]:
    """Candidate triggers for ``classes`` from a local causal language model."""
    s = _transformers_settings(settings, key)
    return parse_candidates(generate_answer(s, build_prompt(s, classes, key), key), s["count"], key)

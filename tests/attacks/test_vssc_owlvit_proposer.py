"""VSSC's OWL-ViT quality check and language-model trigger proposers, on tiny local models and a
local fake chat server (no network, no downloaded weights)."""

from __future__ import annotations

import http.server
import itertools
import json
import socket
import threading

import numpy as np
import pytest

from poisonflow.errors import ConfigError
from poisonflow.vssc import owlvit, proposer

OWL_KEY = "attacks.v.trigger.quality.owlvit"
LM_KEY = "generators.select.proposer"


# --------------------------------------------------------------------------------------------
# OWL-ViT check
# --------------------------------------------------------------------------------------------

def test_passes_needs_both_queries_at_their_thresholds():
    category = [0.30, 0.05, 0.30, 0.10, 0.0]
    trigger = [0.20, 0.90, 0.09, 0.10, 1.0]
    assert passes_list(category, trigger, (0.1, 0.1)) == [True, False, False, True, False]
    assert passes_list(category, trigger, (0.0, 0.2)) == [True, True, False, False, True]


def passes_list(category, trigger, thresholds):
    return owlvit.passes(np.array(category), np.array(trigger), thresholds).tolist()


def test_query_scores_take_the_best_box_of_each_query():
    logits = np.array([[[0.0, -2.0], [np.log(3.0), -1.0], [-5.0, -3.0]]])  # 1 image, 3 boxes, 2 queries
    np.testing.assert_allclose(owlvit.query_scores(logits), [[0.75, 1 / (1 + np.e)]], rtol=1e-6)


def _save_tiny_owl(folder, model_class):
    import transformers

    vocab = {}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    # the start token's id must be > 0: the detector masks out a query whose first id is 0 (padding)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    prefix = {"owlvit": "OwlViT", "owlv2": "Owlv2"}[model_class]
    config = getattr(transformers, prefix + "Config")(
        text_config={"vocab_size": len(vocab), "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": bos,
                     "eos_token_id": eos, "pad_token_id": eos},
        vision_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=8)
    getattr(transformers, prefix + "ForObjectDetection")(config).save_pretrained(folder)
    image_processor = getattr(transformers, prefix + "ImageProcessor")(size={"height": 32, "width": 32})
    getattr(transformers, prefix + "Processor")(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


@pytest.mark.parametrize("model_class", ["owlvit", "owlv2"])
def test_owl_check_loads_a_local_detector_and_scores_both_queries(tmp_path, model_class):
    folder = tmp_path / model_class
    _save_tiny_owl(folder, model_class)
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)  # upscaled to 32 px
    categories = ["dog", "cat", "dog", "fish", "cat"]
    check = owlvit.build({"weights": str(folder), "model_class": model_class, "batch_size": 2}, "cpu", OWL_KEY)
    scores = check.scores(images, categories, "red flower")
    assert scores.shape == (5, 2) and ((scores > 0) & (scores < 1)).all()
    # column 0 follows the category query, column 1 the trigger query
    other = check.scores(images, ["pug"] * 5, "red flower")
    np.testing.assert_allclose(other[:, 1], scores[:, 1], atol=1e-6)
    assert np.abs(other[:, 0] - scores[:, 0]).max() > 1e-4
    # batching does not change a score
    one_batch = owlvit.build({"weights": str(folder), "model_class": model_class, "batch_size": 8}, "cpu", OWL_KEY)
    np.testing.assert_allclose(one_batch.scores(images, categories, "red flower"), scores, atol=1e-5)
    result = check.check(images, categories, "red flower")
    assert result.dtype == bool and result.shape == (5,)
    assert result.tolist() == ((scores[:, 0] >= 0.1) & (scores[:, 1] >= 0.1)).tolist()
    # a trigger threshold between the lowest and the highest trigger score splits the images
    middle = float(np.median(scores[:, 1]))
    split = owlvit.build({"weights": str(folder), "model_class": model_class, "category_threshold": 0.0,
                          "trigger_threshold": middle}, "cpu", OWL_KEY)
    assert split.check(images, categories, "red flower").tolist() == (scores[:, 1] >= middle).tolist()
    assert owlvit.build({"weights": str(folder), "model_class": model_class, "threshold": 1.0},
                        "cpu", OWL_KEY).check(images, categories, "red flower").sum() == 0


def test_owl_check_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{OWL_KEY}\.weights: .*quality\.backend: clip or none"):
        owlvit.build({"weights": str(tmp_path / "absent")}, "cpu", OWL_KEY)
    with pytest.raises(ConfigError, match=rf"^{OWL_KEY}\.weights:"):
        owlvit.build({}, "cpu", OWL_KEY)
    with pytest.raises(ConfigError, match=rf"^{OWL_KEY}\.trigger_threshold:"):
        owlvit.build({"weights": str(tmp_path), "trigger_threshold": 1.5}, "cpu", OWL_KEY)
    with pytest.raises(ConfigError, match=rf"^{OWL_KEY}\.model_class:"):
        owlvit.build({"weights": str(tmp_path), "model_class": "detr"}, "cpu", OWL_KEY)
    with pytest.raises(ConfigError, match=rf"^{OWL_KEY}\.trigger_query:"):
        owlvit.build({"weights": str(tmp_path), "trigger_query": "a {object}"}, "cpu", OWL_KEY)
    with pytest.raises(ConfigError, match=rf"^{OWL_KEY}\.tresh: unknown key"):
        owlvit.build({"tresh": 0.2}, "cpu", OWL_KEY)


# --------------------------------------------------------------------------------------------
# answer parsing
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ('Sure!\n```json\n["Red flower", "harness", "red flower ", "Strawberry."]\n```', ["red flower", "harness", "strawberry"]),
    (("Candidates:\n1. **Red Flower**: fits every breed.\n2) 'Harness' - worn by dogs\n3. collar (common)\n"
      "Hope this helps."), ["red flower", "harness", "collar"]),
    ("- “tennis ball”\n* leash;\n• Bowl — for food", ["tennis ball", "leash", "bowl"]),
    ('[{"name": "Nuts", "reason": "x"}, {"name": "strawberry"}]', ["nuts", "strawberry"]),
    ('Pick from [1, 2]\n1. lemon slice\n2. fork', ["lemon slice", "fork"]),
])
def test_parse_candidates_reads_lists_and_cleans_names(answer, expected):
    assert proposer.parse_candidates(answer, 10, LM_KEY) == expected


def test_parse_candidates_keeps_at_most_count_and_quotes_an_unusable_answer():
    assert proposer.parse_candidates('["a", "b", "c", "d"]', 2, LM_KEY) == ["a", "b"]
    with pytest.raises(ConfigError, match=rf"^{LM_KEY}: .*begins: 'I cannot help with that"):
        proposer.parse_candidates("I cannot help with that request.\nSorry.", 5, LM_KEY)


def test_prompt_carries_classes_count_and_criteria():
    s = proposer._common({"count": 3}, proposer.OPENAI_DEFAULTS, LM_KEY)
    prompt = proposer.build_prompt(s, ["Maltese dog", "pug"], LM_KEY)
    assert "Maltese dog, pug" in prompt and "Propose 3 candidate" in prompt and "Compatible:" in prompt
    with pytest.raises(ConfigError, match=rf"^{LM_KEY}\.prompt: cannot fill"):
        proposer.build_prompt({**s, "prompt": "{classes} {colour}"}, ["pug"], LM_KEY)


# --------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint
# --------------------------------------------------------------------------------------------

class _ChatHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.server.reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    """``start(reply_bytes) -> (base_url, requests)``: a local server answering every POST with ``reply_bytes``."""
    servers = []

    def start(reply: bytes):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
        server.reply, server.requests = reply, []
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", server.requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _completion(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "model": "tiny-chat",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()


def test_openai_proposer_posts_the_prompt_and_parses_the_answer(chat_server, monkeypatch):
    monkeypatch.setenv("POISONFLOW_TEST_LLM_KEY", "sk-local-123")
    url, requests = chat_server(_completion('Here you are: ["Red flower", "harness", "HARNESS", "collar"]'))
    settings = {"backend": "openai", "url": url + "/", "model": "tiny-chat", "api_key_env": "POISONFLOW_TEST_LLM_KEY",
                "count": 3, "temperature": 0.2, "timeout": 5}
    assert proposer.propose_openai(settings, ["Maltese dog", "pug"], LM_KEY) == ["red flower", "harness", "collar"]
    (request,) = requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-local-123"
    body = request["body"]
    assert body["model"] == "tiny-chat" and body["temperature"] == 0.2 and body["max_tokens"] == 512
    assert body["messages"][0]["role"] == "user" and "Maltese dog, pug" in body["messages"][0]["content"]


def test_openai_proposer_errors_name_the_key(chat_server, monkeypatch, silent_server):
    garbage, _ = chat_server(b"<html>gateway oops</html>")
    with pytest.raises(ConfigError, match=rf"^{LM_KEY}\.url: .*chat completion.*gateway oops"):
        proposer.propose_openai({"url": garbage, "timeout": 5}, ["pug"], LM_KEY)
    refusal, _ = chat_server(_completion("I would rather not say."))
    with pytest.raises(ConfigError, match=rf"^{LM_KEY}: .*begins: 'I would rather not say"):
        proposer.propose_openai({"url": refusal, "timeout": 5}, ["pug"], LM_KEY)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connection refused
    with pytest.raises(ConfigError, match=rf"^{LM_KEY}\.url: cannot reach http://127\.0\.0\.1:{port}/v1/chat"):
        proposer.propose_openai({"url": f"http://127.0.0.1:{port}/v1", "timeout": 5}, ["pug"], LM_KEY)
    with pytest.raises(ConfigError, match=rf"^{LM_KEY}\.url: cannot reach .*timed out"):
        proposer.propose_openai({"url": silent_server, "timeout": 0.3}, ["pug"], LM_KEY)
    monkeypatch.delenv("POISONFLOW_TEST_LLM_KEY", raising=False)
    with pytest.raises(ConfigError, match=rf"^{LM_KEY}\.api_key_env: .*POISONFLOW_TEST_LLM_KEY"):
        proposer.propose_openai({"url": garbage, "api_key_env": "POISONFLOW_TEST_LLM_KEY"}, ["pug"], LM_KEY)
    with pytest.raises(ConfigError, match=rf"^{LM_KEY}\.url: .*http"):
        proposer.propose_openai({"url": "file:///etc/passwd"}, ["pug"], LM_KEY)


# --------------------------------------------------------------------------------------------
# local causal language model
# --------------------------------------------------------------------------------------------

# Words of a bigram model's answer, each followed by the next; the chain starts at the chat
# template's assistant marker.
ANSWER_CHAIN = ['["', "Red", " ", "flower", '", "', "harness", '"]']


def _save_bigram_lm(folder):
    """A 1-layer GPT-2 whose attention and MLP are zeroed and whose positions are ignored, so the
    next token depends on the current one only: after ``<|assistant|>`` it writes
    ``["Red flower", "harness"]`` and stops; after any other token it writes ``<unk>``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    specials = ["<unk>", "<eos>", "<|assistant|>"]
    vocab = {token: i for i, token in enumerate(specials + ANSWER_CHAIN)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                        pad_token="<eos>", additional_special_tokens=["<|assistant|>"])
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} <|assistant|>{% endif %}")
    tokenizer.save_pretrained(folder)

    n = len(vocab)
    config = GPT2Config(vocab_size=n, n_positions=1024, n_embd=n, n_layer=1, n_head=1, bos_token_id=1,
                        eos_token_id=1, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config)
    successor = {"<|assistant|>": ANSWER_CHAIN[0], ANSWER_CHAIN[-1]: "<eos>", "<unk>": "<unk>"}
    successor.update(itertools.pairwise(ANSWER_CHAIN))
    with torch.no_grad():
        for name, parameter in model.transformer.h.named_parameters():
            if not name.startswith("ln_"):
                parameter.zero_()  # attention and MLP add nothing to the residual stream
        model.transformer.wpe.weight.zero_()
        model.transformer.wte.weight.copy_(torch.eye(n))
        model.lm_head.weight.zero_()
        for current, following in successor.items():
            model.lm_head.weight[vocab[following], vocab[current]] = 1.0
    model.save_pretrained(folder)


def test_transformers_proposer_runs_a_local_model_in_its_chat_template(tmp_path):
    folder = tmp_path / "lm"
    _save_bigram_lm(folder)
    settings = {"backend": "transformers", "path": str(folder), "max_new_tokens": 12, "device": "cpu"}
    assert proposer.propose_transformers(settings, ["Maltese dog", "pug"], LM_KEY) == ["red flower", "harness"]
    assert proposer.generate_answer(proposer._transformers_settings(settings, LM_KEY), "x", LM_KEY) \
        == '["Red flower", "harness"]'
    with pytest.raises(ConfigError, match=rf"^{LM_KEY}\.path: .*proposer\.backend: openai"):
        proposer.propose_transformers({"path": str(tmp_path / "absent")}, ["pug"], LM_KEY)

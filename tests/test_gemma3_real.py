"""The real Gemma 3 270M (catalogue `gemma3-270m`, GGUF Q4_K_M) against llama.cpp on the same file.

Over 512 tokens of Hamlet, llmcli's next-token top-1 and perplexity are compared with
llama-cpp-python's (tests/llamacpp_ref.py). llmcli runs the file's blocks (Q4_K, Q6_K, Q5_0,
Q8_0) with activations rounded to 8-bit blocks as ggml does. Measured 2026-12-03 on an AVX-512
machine: 94.9% top-1 agreement, llama.cpp with itself (F16 against F32 K/V cache) 94.3%;
perplexity 77.59 against llama.cpp's 77.23 (F16 cache) and 76.96 (F32).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.llamacpp_ref import agreement_floor, assert_perplexity_agrees

N = 512


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf):
    from llmcli.core.loader import load_model

    return load_model(gemma3_gguf)


@pytest.fixture(scope="module")
def hamlet_ids(gemma3, hamlet) -> list[int]:
    ids = gemma3.tokenizer.encode(hamlet[5000:12000], add_special=True).ids[:N]
    assert len(ids) == N
    return ids


@pytest.fixture(scope="module")
def llama_cpp_runs(gemma3_gguf, hamlet_ids) -> dict[str, np.ndarray]:
    """llama.cpp's top-1 ids and perplexity on the same file: its default run (F16 K/V cache) and
    one with an F32 cache and no flash attention (the attention arithmetic llmcli uses)."""
    from tests.llamacpp_ref import llamacpp_logits, token_nll

    runs = {}
    for name, f32_kv in (("default", False), ("f32_kv", True)):
        logits = llamacpp_logits(gemma3_gguf, hamlet_ids, f32_kv=f32_kv)
        runs[name] = np.argmax(logits, axis=-1)
        runs[name + "_nll"] = token_nll(logits, hamlet_ids)
        del logits  # 512 x 262144 floats each
    return runs


@pytest.fixture(scope="module")
def ours_logits(gemma3, hamlet_ids) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(N, 5) top-5 logits, (N, 5) their ids, and the negative log-likelihood of each of ids[1:],
    prefilled in chunks through the KV cache (a 512-token window: layers 0-4 slide)."""
    from llmcli.core.models.base import KVCache

    cache = KVCache.for_model(gemma3.config, 1, N)
    values, indices, nll = [], [], []
    ids = torch.tensor(hamlet_ids)
    with torch.inference_mode():
        for start in range(0, N, 128):
            logits = gemma3.module(ids[None, start : start + 128], cache=cache).logits[0]
            top = logits.topk(5, dim=-1)
            values.append(top.values)
            indices.append(top.indices)
            targets = ids[start + 1 : start + 129]
            logp = torch.log_softmax(logits[: len(targets)].double(), dim=-1)
            nll.append(-logp.gather(1, targets[:, None])[:, 0].numpy())
    return torch.cat(values), torch.cat(indices), np.concatenate(nll)


def floor_of(runs: dict[str, np.ndarray]) -> float:
    """tests/llamacpp_ref.agreement_floor of llama.cpp's two runs over the N positions."""
    return agreement_floor(float((runs["default"] == runs["f32_kv"]).mean()), N)


def test_gemma3_config_from_the_gguf(gemma3):
    c = gemma3.config
    assert c.model_type == "gemma3_text" and c.num_hidden_layers == 18 and c.head_dim == 256 and c.sliding_window == 512
    assert c.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert c.args == {"query_pre_attn_scalar": 256, "final_logit_softcapping": None, "rope_local_base_freq": 10000.0}
    assert c.tie_word_embeddings and c.vocab_size == 262144


def test_disagreements_with_llama_cpp_are_near_ties(ours_logits, llama_cpp_runs):
    """Where llmcli's next token is not llama.cpp's, llama.cpp's pick is among llmcli's top 5 and
    less than one logit below llmcli's own first choice: a near-tie, not a wrong model. There are
    no more such places than llama.cpp's own two runs allow (floor_of)."""
    values, indices, _ = ours_logits
    reference = llama_cpp_runs["f32_kv"]
    differ = np.nonzero(indices[:, 0].numpy() != reference)[0]
    assert len(differ) <= (1 - floor_of(llama_cpp_runs)) * N
    for i in differ:
        rank = np.nonzero(indices[i].numpy() == reference[i])[0]
        assert len(rank) == 1, i
        assert float(values[i, 0] - values[i, rank[0]]) < 1.0, i


def test_agrees_with_llama_cpp_as_llama_cpp_agrees_with_itself(ours_logits, llama_cpp_runs):
    """Issue 14 asks for 99% top-1; llama.cpp's own two runs on this file (F16 and F32 K/V cache)
    agree on about 95% only, because 8-bit activation rounding amplifies any small difference
    (tests/test_llamacpp_accuracy.py explains it). So llmcli is held to llama.cpp's
    reproducibility (less two binomial standard errors), and its log perplexity to as far from
    llama.cpp's as llama.cpp's two runs are from each other, plus three standard errors
    (tests/llamacpp_ref.log_perplexity_allowance: a fixed 0.5% was a coin flip, see there)."""
    _, indices, nll_ours = ours_logits
    itself = float((llama_cpp_runs["default"] == llama_cpp_runs["f32_kv"]).mean())
    floor = floor_of(llama_cpp_runs)
    top1 = float((indices[:, 0].numpy() == llama_cpp_runs["f32_kv"]).mean())
    assert top1 >= floor, f"top-1 agreement {top1:.4f} < {floor:.4f} (llama.cpp with itself: {itself:.4f})"
    assert 1 < math.exp(llama_cpp_runs["f32_kv_nll"].mean()) < 200  # a trained model on English text
    assert_perplexity_agrees(nll_ours, llama_cpp_runs["f32_kv_nll"], llama_cpp_runs["default_nll"])


def test_generate_and_attend_stages_run_on_gemma3(gemma3_gguf, run_llmcli):
    """The pipe stages on the real file: tokenize | generate, and attend with the window's attention."""
    tokenized = run_llmcli("tokenize", "-m", "gemma3-270m", input=json.dumps({"text": "The capital of France is"}) + "\n")
    assert tokenized.returncode == 0, tokenized.stderr
    generated = run_llmcli("generate", "-m", str(gemma3_gguf), "-n", "4", "--temperature", "0", input=tokenized.stdout)
    assert generated.returncode == 0, generated.stderr
    record = json.loads(generated.stdout)
    assert len(record["generated_ids"]) == 4 and record["ids"] == json.loads(tokenized.stdout)["ids"]


def test_chat_runs_on_gemma3_in_its_turn_format(gemma3, gemma3_gguf, run_llmcli):
    """The base gemma3-270m carries no chat template: chat uses Gemma 3's turn format, and its
    reply is the greedy continuation of that prompt, stopped at <end_of_turn>."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    proc = run_llmcli("chat", "--model", str(gemma3_gguf), "--max-tokens", "6", "--temperature", "0", input=json.dumps({"messages": messages}) + "\n")
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)["reply"]
    prompt, encoding = gemma3.tokenizer.encode_chat(messages)
    assert prompt.endswith("<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n")
    ids = list(encoding.ids)
    start = len(ids)
    with torch.inference_mode():
        for _ in range(6):
            nxt = int(gemma3.module(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt in gemma3.tokenizer.eos_token_ids:
                break
            ids.append(nxt)
    assert reply == gemma3.tokenizer.decode(ids[start:])

"""scripts/generate.py: KV cache against full recompute, greedy, seeded sampling, top-k/top-p."""

from __future__ import annotations

import pytest
import torch

from moe_layers import MoETransformer
import generate
import sampling
from helpers import run_script, save_in_process, tiny_config, tokens


# ----------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def sampler(trained):
    return generate.load_model(str(trained / "ck"))


def test_kv_cache_logits_equal_full_recompute(sampler):
    """Prompt of 5, a chunk of 4 (bottom-right causal mask), then one token at a time up to seq_length."""
    x = tokens(256, (1, 16), seed=5)
    with torch.no_grad():
        full = sampler(x).output[0]  # (T, V)
        caches = [{} for _ in sampler.layers]
        got = [sampler(x[:, :5], positions=torch.arange(5), kv_caches=caches).output[0],
               sampler(x[:, 5:9], positions=torch.arange(5, 9), kv_caches=caches).output[0]]
        for t in range(9, 16):
            got.append(sampler(x[:, t:t + 1], positions=torch.tensor([t]), kv_caches=caches).output[0])
    assert caches[0]["k"].shape[2] == 16
    assert (torch.cat(got) - full).abs().max() < 1e-5


def test_greedy_with_cache_equals_greedy_recomputed_and_stops_at_seq_length(sampler):
    prompt = list(b"def ")
    cached, stopped = generate.generate(sampler, prompt, 12, temperature=0)
    plain, _ = generate.generate(sampler, prompt, 12, temperature=0, use_cache=False)
    assert cached == plain and len(cached) == 12 and not stopped
    # by hand: argmax of the full forward pass, one token at a time
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(sampler(torch.tensor([ids])).output[0, -1].argmax()))
    assert ids[4:] == cached
    # past the rotary table: the cache stops after the token fed at position 15 predicts one more
    long_cached, stopped = generate.generate(sampler, prompt, 20, temperature=0)
    long_plain, _ = generate.generate(sampler, prompt, 20, temperature=0, use_cache=False)
    assert stopped and len(long_cached) == 16 - len(prompt) + 1 and len(long_plain) == 20
    assert long_plain[:len(long_cached)] == long_cached


def test_seeded_sampling_is_reproducible_and_the_same_with_and_without_cache(sampler):
    draw = dict(temperature=1.5, top_k=0, top_p=1.0)
    a, _ = generate.generate(sampler, [10], 15, seed=1, **draw)
    assert a == generate.generate(sampler, [10], 15, seed=1, **draw)[0]
    assert a == generate.generate(sampler, [10], 15, seed=1, use_cache=False, **draw)[0]
    long_a, _ = generate.generate(sampler, [10], 40, seed=1, use_cache=False, **draw)
    long_b, _ = generate.generate(sampler, [10], 40, seed=2, use_cache=False, **draw)
    assert long_a[:15] == a and long_a != long_b  # 40 draws at temperature 1.5: a repeat is hopeless


def test_top_k_1_and_tiny_top_p_equal_greedy(sampler):
    greedy, _ = generate.generate(sampler, list(b"import"), 10, temperature=0)
    assert generate.generate(sampler, list(b"import"), 10, temperature=1.0, top_k=1, seed=3)[0] == greedy
    assert generate.generate(sampler, list(b"import"), 10, temperature=1.0, top_p=1e-6, seed=4)[0] == greedy


def test_sampling_probs_by_hand():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log()
    assert torch.allclose(sampling.sampling_probs(logits, 1.0), p)
    assert torch.allclose(sampling.sampling_probs(logits, 1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(sampling.sampling_probs(logits, 1.0, top_p=0.9), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    assert torch.allclose(sampling.sampling_probs(logits, 1.0, top_k=2), torch.tensor([0.625, 0.375, 0, 0]))
    root = p.sqrt()  # temperature 2: p^(1/2), renormalised
    assert torch.allclose(sampling.sampling_probs(logits, 2.0), root / root.sum())


def test_generate_cli_prints_the_greedy_text_and_refuses_long_prompts(trained, sampler):
    r = run_script("generate.py", ["--checkpoint", str(trained / "ck"), "--prompt", "def ", "--max-new-tokens", "8",
                                   "--temperature", "0"])
    assert r.returncode == 0, r.stderr
    expected = bytes(list(b"def ") + generate.generate(sampler, list(b"def "), 8, temperature=0)[0])
    assert r.stdout.rstrip("\n") == expected.decode("utf-8", errors="replace")
    assert "tokens/s" in r.stderr
    r = run_script("generate.py", ["--checkpoint", str(trained / "ck"), "--prompt", "x" * 17])
    assert r.returncode == 2 and "more than the model's seq_length 16" in r.stderr and "Traceback" not in r.stderr


def test_generate_cli_takes_and_prints_ids_for_token_vocabularies(tmp_path):
    model = MoETransformer(tiny_config(vocab_size=64), seed=5).eval()
    ck = save_in_process(model, tmp_path / "ck")
    r = run_script("generate.py", ["--checkpoint", ck, "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                                   "--temperature", "0"])
    assert r.returncode == 0, r.stderr
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).output[0, -1].argmax()))
    assert r.stdout.strip() == ",".join(map(str, ids))

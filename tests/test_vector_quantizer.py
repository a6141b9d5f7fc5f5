"""Vector quantizer: cosine lookup, EMA rule, dead-code restarts, statistics, loading, distributed sync."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from videolavit.models.vector_quantizer import VectorQuantizer, perplexity




def _quantizer(weight, **kwargs) -> VectorQuantizer:
    q = VectorQuantizer(num_codes=weight.shape[0], code_dim=weight.shape[1], **kwargs)
    q.embedding.weight.copy_(F.normalize(weight, dim=-1))
    return q


AXES = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0]])
NEAR_CODE_0 = torch.tensor([[2.0, 0.2, 0.0], [1.0, -0.1, 0.1], [3.0, 0.0, 0.5]])
NEAR_CODE_2 = torch.tensor([[0.0, 0.1, 1.0], [0.2, 0.0, 2.0]])


def test_lookup_is_cosine_nearest_and_ignores_input_scale():
    torch.manual_seed(0)
    q = VectorQuantizer(num_codes=64, code_dim=8)
    z = torch.randn(5, 7, 8)
    ids = q.encode(z)
    expected = (F.normalize(z, dim=-1) @ q.embedding.weight.t()).argmax(-1)
    assert ids.shape == (5, 7) and ids.dtype == torch.long
    assert torch.equal(ids, expected)
    assert torch.equal(q.encode(z * 37.0), ids)
    assert torch.allclose(q.embedding.weight.norm(dim=-1), torch.ones(64))


def test_codebook_is_a_buffer_not_a_parameter():
    q = VectorQuantizer(num_codes=16, code_dim=4)
    assert list(q.parameters()) == []
    assert set(q.state_dict()) == {"embedding.weight", "cluster_size", "num_updates"}
    assert q.state_dict()["embedding.weight"].shape == (16, 4)


def test_ema_moves_assigned_codes_towards_their_mean_and_leaves_the_rest():
    decay = 0.9
    q = _quantizer(AXES, decay=decay, commitment_beta=0.5, dead_code_interval=0).train()
    old = q.embedding.weight.clone()
    z = torch.cat([NEAR_CODE_0, NEAR_CODE_2])
    out = q(z)
    assert out.ids.tolist() == [0, 0, 0, 2, 2]

    new = q.embedding.weight
    for code, members in ((0, NEAR_CODE_0), (2, NEAR_CODE_2)):
        target = F.normalize(F.normalize(members, dim=-1).mean(0), dim=0)
        expected = F.normalize(decay * old[code] + (1 - decay) * target, dim=0)
        assert torch.allclose(new[code], expected, atol=1e-6)
        assert not torch.allclose(new[code], old[code])
    assert torch.equal(new[1], old[1]) and torch.equal(new[3], old[3])
    assert torch.allclose(q.cluster_size, (1 - decay) * torch.tensor([3.0, 0, 2, 0]))
    assert int(q.num_updates) == 1

    # commitment loss is measured against the codes *before* this step's update
    zn = F.normalize(z, dim=-1)
    expected_commit = 0.5 * ((zn - old[out.ids]) ** 2).mean()
    assert torch.allclose(out.commit_loss, expected_commit)


def test_no_update_in_eval_mode_or_in_encode():
    q = _quantizer(AXES, decay=0.5)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()(torch.cat([NEAR_CODE_0, NEAR_CODE_2]))
    q.train().encode(NEAR_CODE_0)
    for key, value in q.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unused_code_is_restarted_exactly_at_the_interval():
    torch.manual_seed(0)
    q = _quantizer(AXES, decay=0.9, dead_code_interval=3, dead_code_threshold=0.5).train()
    start = q.embedding.weight.clone()
    batches = [NEAR_CODE_0 + 0.01 * torch.randn_like(NEAR_CODE_0) for _ in range(3)]
    for batch in batches[:2]:
        q(batch)
    # steps 1-2: code 0 drifts by EMA; unused codes are already dead but untouched until the check
    assert torch.equal(q.embedding.weight[1:], start[1:])
    assert q.dead_codes().tolist() == [False, True, True, True]
    q(batches[2])
    weight = q.embedding.weight
    candidates = F.normalize(batches[2], dim=-1)
    for code in (1, 2, 3):  # never used -> restarted from this batch's normalised inputs
        assert not torch.equal(weight[code], start[code])
        assert torch.isclose(candidates @ weight[code], torch.tensor(1.0), atol=1e-6).any()
    # code 0, used at every step, is not restarted: it equals a restart-free EMA run
    no_restarts = _quantizer(AXES, decay=0.9, dead_code_interval=0).train()
    for batch in batches:
        no_restarts(batch)
    assert torch.allclose(weight[0], no_restarts.embedding.weight[0])
    # restarted codes get a fair share of the EMA count, so they are not dead at the next check
    assert not q.dead_codes().any()


def test_restarted_code_count_is_a_uniform_share():
    q = _quantizer(AXES, decay=0.9, dead_code_interval=1, dead_code_threshold=0.5).train()
    q(NEAR_CODE_0)
    total_before_restart = 0.1 * 3  # only code 0 counted: (1 - decay) * 3 assignments
    assert torch.allclose(q.cluster_size[1:], torch.full((3,), total_before_restart / 4))
    assert math.isclose(float(q.cluster_size[0]), total_before_restart, rel_tol=1e-6)


def test_usage_and_perplexity_on_constructed_assignments():
    q = _quantizer(AXES, dead_code_interval=0).eval()
    all_one = q(NEAR_CODE_0)
    assert float(all_one.usage) == pytest.approx(1 / 4)
    assert float(all_one.perplexity) == pytest.approx(1.0)

    even = q(AXES * 2.0)  # each code receives itself
    assert float(even.usage) == pytest.approx(1.0)
    assert float(even.perplexity) == pytest.approx(4.0)

    mixed = q(torch.cat([NEAR_CODE_0, NEAR_CODE_2[:1]]))  # 3:1 split
    p = torch.tensor([0.75, 0.25])
    assert float(mixed.perplexity) == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert float(perplexity(torch.zeros(4))) == pytest.approx(1.0)  # empty histogram does not NaN


def test_straight_through_gradient_is_that_of_the_normalised_input():
    torch.manual_seed(0)
    q = VectorQuantizer(num_codes=32, code_dim=6, dead_code_interval=0).train()
    z = torch.randn(10, 6, requires_grad=True)
    probe = torch.randn(10, 6)
    codes_before = q.embedding.weight.clone()
    out = q(z)
    (out.quantized * probe).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)
    (F.normalize(z_ref, dim=-1) * probe).sum().backward()
    assert torch.allclose(z.grad, z_ref.grad, atol=1e-6)
    # ... while the value passed on is the (pre-update) code itself
    assert torch.allclose(out.quantized, codes_before[out.ids], atol=1e-6)


def test_quantized_value_is_the_pre_update_code():
    q = _quantizer(AXES, decay=0.5, dead_code_interval=0).train()
    old = q.embedding.weight.clone()
    out = q(NEAR_CODE_0)
    assert torch.allclose(out.quantized, old[0].expand(3, 3), atol=1e-6)


def test_release_state_dict_loads_strictly_and_resets_ema_statistics():
    q = VectorQuantizer(num_codes=16, code_dim=4)
    q.cluster_size.fill_(3.0)
    q.num_updates.fill_(7)
    codebook = F.normalize(torch.randn(16, 4), dim=-1)
    result = q.load_state_dict({"embedding.weight": codebook}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(q.embedding.weight, codebook)
    assert torch.equal(q.cluster_size, torch.zeros(16)) and int(q.num_updates) == 0

    with pytest.raises(RuntimeError, match="Unexpected key"):
        q.load_state_dict({"embedding.weight": codebook, "embed_avg": torch.zeros(16, 4)}, strict=True)
    with pytest.raises(RuntimeError, match="Missing key.*embedding.weight"):
        q.load_state_dict({}, strict=True)


def test_full_state_round_trip_keeps_ema_statistics():
    torch.manual_seed(0)
    q = VectorQuantizer(num_codes=16, code_dim=4).train()
    q(torch.randn(50, 4))
    fresh = VectorQuantizer(num_codes=16, code_dim=4)
    fresh.load_state_dict(q.state_dict(), strict=True)
    for key, value in q.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert float(fresh.cluster_size.sum()) > 0


# ---- distributed: two gloo processes keep one codebook ------------------------------------------

def _distributed_worker(rank: int, world: int, workdir: str, halves: list) -> None:
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)  # same initial codebook on both ranks
        q = VectorQuantizer(num_codes=32, code_dim=4, decay=0.8, dead_code_interval=0).train()
        out = q(halves[rank])
        first = {k: v.clone() for k, v in q.state_dict().items()}
        # second step: restart nearly every code; ranks draw different random numbers, so only the
        # broadcast from rank 0 can keep them identical
        torch.manual_seed(100 + rank)
        q.dead_code_interval, q.dead_code_threshold = 1, 2.0
        q(halves[rank])
        torch.save({"first": first, "usage": out.usage, "perplexity": out.perplexity,
                    "second": q.state_dict()}, f"{workdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_keep_one_codebook_equal_to_the_single_process_update(tmp_path):
    torch.manual_seed(1)
    batch = torch.randn(40, 4)
    halves = [batch[:25], batch[25:]]  # unequal shares: counts and sums must be summed, not averaged
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_distributed_worker, args=(2, str(tmp_path), halves), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    torch.manual_seed(0)
    reference = VectorQuantizer(num_codes=32, code_dim=4, decay=0.8, dead_code_interval=0).train()
    ref_out = reference(batch)
    for result in ranks:
        for key in ("embedding.weight", "cluster_size", "num_updates"):
            assert torch.allclose(result["first"][key].float(), reference.state_dict()[key].float(),
                                  atol=1e-6), key
        assert float(result["usage"]) == pytest.approx(float(ref_out.usage))
        assert float(result["perplexity"]) == pytest.approx(float(ref_out.perplexity), rel=1e-5)
    second0, second1 = ranks[0]["second"], ranks[1]["second"]
    assert not torch.equal(second0["embedding.weight"], ranks[0]["first"]["embedding.weight"])
    for key in second0:
        assert torch.equal(second0[key], second1[key]), key

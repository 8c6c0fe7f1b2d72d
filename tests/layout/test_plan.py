"""The dry-run planner: parameter counts against formulas written out here, memory terms against the
byte rules they document, the MindSpeed 671B templates, and the CLI's exit codes."""

import os
import subprocess
import sys

import pytest

from mindspeed_dsv.layout import LayoutError, ParallelLayout
from mindspeed_dsv.plan import GiB, PlanError, TrainArgs, format_plan, make_plan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def v3_counts(c):
    """Parameter count of DeepSeek-V3 from its config, written out term by term (HF module shapes)."""
    h, V = c["hidden_size"], c["vocab_size"]
    nh, qr, kvr = c["num_attention_heads"], c["q_lora_rank"], c["kv_lora_rank"]
    rope, nope, vd = c["qk_rope_head_dim"], c["qk_nope_head_dim"], c["v_head_dim"]
    E, k, shared = c["n_routed_experts"], c["num_experts_per_tok"], c["n_shared_experts"]
    ffn, mffn = c["intermediate_size"], c["moe_intermediate_size"]
    attn = (h * qr + qr                      # q_a_proj, q_a_layernorm
            + qr * nh * (nope + rope)        # q_b_proj
            + h * (kvr + rope) + kvr         # kv_a_proj_with_mqa, kv_a_layernorm
            + kvr * nh * (nope + vd)         # kv_b_proj
            + nh * vd * h)                   # o_proj
    norms = 2 * h                            # input_layernorm, post_attention_layernorm
    dense_mlp = 3 * h * ffn                  # gate, up, down
    expert = 3 * h * mffn
    router = E * h + E                       # gate.weight, e_score_correction_bias
    moe_mlp = E * expert + shared * expert + router
    dense_layer = attn + norms + dense_mlp
    moe_layer = attn + norms + moe_mlp
    n_dense = c["first_k_dense_replace"]
    n_moe = c["num_hidden_layers"] - n_dense
    emb = V * h
    total = n_dense * dense_layer + n_moe * moe_layer + emb + emb + h   # embed, lm_head, final norm
    active_moe_layer = attn + norms + (k + shared) * expert + router
    activated = n_dense * dense_layer + n_moe * active_moe_layer + 2 * emb + h
    mtp = 2 * h + 2 * h * h + moe_layer + h      # enorm, hnorm, eh_proj, layer, shared_head.norm
    hf_file = total + c["num_nextn_predict_layers"] * (mtp + 2 * emb)  # + MTP's embed_tokens, shared_head.head
    return total, activated, mtp, hf_file


def test_671b_parameter_count(cfg671):
    total, activated, mtp, hf_file = v3_counts(cfg671)
    plan = make_plan(cfg671, ParallelLayout(), TrainArgs())
    assert plan.total_params == total == 671_026_419_200
    assert plan.activated_params == activated
    assert plan.mtp_params == mtp
    assert plan.hf_checkpoint_params == hf_file
    assert 670e9 < total < 672e9          # "671B total"
    assert 37e9 < activated < 38e9        # "37B activated"
    assert 684e9 < hf_file < 686e9        # the HF repo's "685B" includes the MTP module
    # pp=1: the single stage holds everything, main model + MTP (which shares embedding/output).
    assert plan.stages[0].params == total + mtp


def test_stage_params_sum_and_per_device(cfg671):
    c = cfg671
    lay = ParallelLayout(tp=2, pp=16, ep=8, num_layers=64, noop_layers="47,62,63", moe_tp_extend_ep=True,
                         sequence_parallel=True, mtp_num_layers=1)
    plan = make_plan(c, lay, TrainArgs(world_size=256))
    total, _, mtp, _ = v3_counts(c)
    assert sum(s.params for s in plan.stages) == total + mtp
    # A middle stage (4 MoE layers) on one device, from the split rules: down projections and norms
    # replicated, up/out projections and shared expert over TP 2, 256/(2*8) = 16 whole experts.
    h, nh = c["hidden_size"], c["num_attention_heads"]
    rep = h * 1536 + 1536 + h * (512 + 64) + 512 + 2 * h + 256 * h + 256
    split = (1536 * nh * 192 + 512 * nh * 256 + nh * 128 * h + 3 * h * 2048) / 2
    experts = 16 * 3 * h * 2048
    assert plan.stages[5].params_per_device == 4 * (rep + split + experts)


def test_memory_terms_follow_the_byte_rules(tiny_cfg):
    lay = ParallelLayout(pp=1, ep=2)
    plain = make_plan(tiny_cfg, lay, TrainArgs(world_size=4, seq_length=64))
    s = plain.stages[0]
    n = s.params_per_device
    bias = (tiny_cfg["num_hidden_layers"] - tiny_cfg["first_k_dense_replace"] + 1) * tiny_cfg["n_routed_experts"]
    assert s.trainable_per_device == n - bias        # the router expert bias is a buffer
    assert s.memory.weights == 2 * n                 # bf16
    assert s.memory.grads == 4 * (n - bias)          # fp32 main grads
    assert s.memory.optimizer == 12 * (n - bias)     # fp32 master + Adam m, v
    dist = make_plan(tiny_cfg, lay, TrainArgs(world_size=4, seq_length=64, use_distributed_optimizer=True)).stages[0]
    # DP = 4 for dense params; expert-DP = 4/(1*2*1) = 2 for the routed experts (8/2 = 4 local, 3 MoE+MTP layers).
    h, i = tiny_cfg["hidden_size"], tiny_cfg["moe_intermediate_size"]
    expert = 4 * 3 * h * i * (tiny_cfg["num_hidden_layers"] - tiny_cfg["first_k_dense_replace"] + 1)
    assert dist.memory.optimizer == pytest.approx(12 * (n - bias - expert) / 4 + 12 * expert / 2)
    fp32 = make_plan(tiny_cfg, lay, TrainArgs(world_size=4, seq_length=64, bf16=False)).stages[0]
    assert fp32.memory.weights == 4 * n and fp32.memory.optimizer == 8 * (n - bias)


def test_distributed_optimizer_shards_by_group(cfg671):
    lay = ParallelLayout(tp=1, pp=8, ep=64, num_layer_list="7,7,7,8,8,8,8,8", mtp_num_layers=0)
    args = dict(world_size=1024, seq_length=4096)
    plain = make_plan(cfg671, lay, TrainArgs(**args)).stages[3]
    dist = make_plan(cfg671, lay, TrainArgs(use_distributed_optimizer=True, **args)).stages[3]
    # stage 3: 8 MoE layers; 256/64 = 4 experts each; DP = 1024/8 = 128, expert-DP = 1024/(64*8) = 2.
    h = cfg671["hidden_size"]
    expert_params = 8 * 4 * 3 * h * 2048
    dense_params = plain.trainable_per_device - expert_params
    assert dist.memory.optimizer == pytest.approx(12 * dense_params / 128 + 12 * expert_params / 2)


def test_recompute_shrinks_activations(cfg671):
    lay = ParallelLayout(tp=1, pp=4, ep=16, num_layer_list="15,15,16,15", mtp_num_layers=0)
    base = dict(world_size=64, global_batch_size=256)
    none = make_plan(cfg671, lay, TrainArgs(**base)).stages[0].memory.activations
    full = make_plan(cfg671, lay, TrainArgs(recompute_granularity="full", recompute_method="uniform",
                                            recompute_num_layers=1, **base)).stages[0].memory.activations
    assert full < none / 5
    # uniform, N=1, stage 0: 15 layers keep only their input (T*h bf16) for 4 in-flight micro-batches,
    # plus one layer's full working set and the embedding output.
    T, h = 4096, cfg671["hidden_size"]
    assert full > 4 * 15 * T * h * 2


# ----------------------------------------------------------------------------------- MindSpeed templates
TEMPLATES = {
    # MindSpeed-LLM examples/mcore/deepseek3 (pretrain/tune, A2 = 8 NPUs/node, A3 = 16 dies/node)
    "pretrain_A2": (dict(tp=4, pp=8, ep=8, num_layers=64, noop_layers="61,62,63", dualpipev=True,
                         moe_tp_extend_ep=True, moe_grouped_gemm=True, sequence_parallel=True, mtp_num_layers=1),
                    dict(world_size=512, global_batch_size=3840, use_distributed_optimizer=True,
                         recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    "pretrain_A3": (dict(tp=2, pp=8, ep=16, num_layers=64, noop_layers="61,62,63", dualpipev=True,
                         moe_tp_extend_ep=True, moe_grouped_gemm=True, sequence_parallel=True, mtp_num_layers=1),
                    dict(world_size=512, global_batch_size=3840, use_distributed_optimizer=True,
                         recompute_granularity="full", recompute_method="block", recompute_num_layers=8)),
    "tune_full_A2": (dict(tp=1, pp=8, ep=64, num_layers=61, num_layer_list="7,7,7,8,8,8,8,8",
                          moe_grouped_gemm=True, sequence_parallel=True, mtp_num_layers=0),
                     dict(world_size=512, global_batch_size=64, use_distributed_optimizer=True,
                          recompute_granularity="full", recompute_method="block", recompute_num_layers=8)),
    "tune_full_A3": (dict(tp=2, pp=16, ep=8, num_layers=64, noop_layers="47,62,63", moe_tp_extend_ep=True,
                          moe_grouped_gemm=True, sequence_parallel=True, mtp_num_layers=1),
                     dict(world_size=256, global_batch_size=1024, use_distributed_optimizer=True,
                          recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    "tune_lora_A2": (dict(tp=1, pp=4, ep=16, num_layers=61, num_layer_list="15,15,16,15", sequence_parallel=True,
                          mtp_num_layers=0),
                     dict(world_size=64, global_batch_size=256, use_distributed_optimizer=True, lora_r=8,
                          recompute_granularity="full", recompute_method="block", recompute_num_layers=14)),
    "tune_lora_A3": (dict(tp=1, pp=4, ep=16, num_layers=61, num_layer_list="15,15,16,15", sequence_parallel=True,
                          mtp_num_layers=0),
                     dict(world_size=64, global_batch_size=256, use_distributed_optimizer=True, lora_r=8,
                          recompute_granularity="full", recompute_method="block", recompute_num_layers=14)),
    "tune_qlora_A2": (dict(tp=1, pp=8, ep=4, num_layers=61, num_layer_list="7,7,7,8,8,8,8,8", sequence_parallel=True,
                           mtp_num_layers=0),
                      dict(world_size=32, global_batch_size=128, use_distributed_optimizer=True, lora_r=8,
                           qlora_nf4=True)),
    "convert_vpp": (dict(tp=2, pp=8, ep=32, num_layers=64, vpp=2, noop_layers="47,62,63", moe_grouped_gemm=True,
                         sequence_parallel=True, mtp_num_layers=1),
                    dict(world_size=512)),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_mindspeed_671b_templates_plan(cfg671, name):
    lay_kw, train_kw = TEMPLATES[name]
    plan = make_plan(cfg671, ParallelLayout(**lay_kw), TrainArgs(**train_kw))
    covered = sorted(i for s in plan.stages for ch in s.chunks for i in ch.layers)
    assert covered == list(range(plan.layout.num_layers))
    assert sum(len(ch.dense) for s in plan.stages for ch in s.chunks) == 3
    assert sum(len(ch.moe) for s in plan.stages for ch in s.chunks) == 58
    assert all(s.memory.total > 0 for s in plan.stages)
    if name.startswith(("pretrain", "tune_full", "tune_lora")):
        # the full and LoRA training templates fit a 64 GB Ascend device by this estimate (the QLoRA one
        # has no recompute and counts every sequence at full length; the conversion layout has no
        # training flags at all)
        assert plan.max_memory < 64 * GiB, (name, plan.max_memory / GiB)


def test_plan_rejects_bad_training_flags(cfg671):
    lay = ParallelLayout(pp=8, ep=8, num_layers=64, noop_layers="61,62,63")
    with pytest.raises(PlanError, match="--global-batch-size 100 .*--micro-batch-size"):
        make_plan(cfg671, lay, TrainArgs(world_size=64, global_batch_size=100))
    with pytest.raises(PlanError, match="--recompute-method"):
        make_plan(cfg671, lay, TrainArgs(recompute_granularity="full"))
    with pytest.raises(PlanError, match="--qlora-nf4 needs --lora-r"):
        make_plan(cfg671, lay, TrainArgs(qlora_nf4=True))
    with pytest.raises(LayoutError, match="world size 60"):
        make_plan(cfg671, lay, TrainArgs(world_size=60))


# ----------------------------------------------------------------------------------- CLI and asset
def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "mindspeed_dsv.plan", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_help_lists_every_flag():
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ("--model-config", "--tensor-model-parallel-size", "--num-layer-list", "--noop-layers",
                 "--schedules-method", "--num-layers-per-virtual-pipeline-stage", "--moe-tp-extend-ep",
                 "--micro-batch-size", "--seq-length", "--global-batch-size", "--bf16", "--use-distributed-optimizer",
                 "--recompute-granularity", "--recompute-method", "--recompute-num-layers", "--world-size",
                 "--nnodes", "--nproc-per-node", "--lora-r", "--qlora-nf4"):
        assert flag in r.stdout, flag


def test_cli_a3_pretrain_plan():
    r = run_cli("--model-config", "assets/deepseek3_671b", "--tensor-model-parallel-size", "2",
                "--pipeline-model-parallel-size", "8", "--expert-model-parallel-size", "16", "--num-layers", "64",
                "--noop-layers", "61,62,63", "--schedules-method", "dualpipev", "--moe-tp-extend-ep",
                "--sequence-parallel", "--nnodes", "32", "--nproc-per-node", "16", "--global-batch-size", "3840",
                "--use-distributed-optimizer", "--recompute-granularity", "full", "--recompute-method", "block",
                "--recompute-num-layers", "8")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "671,026,419,200" in out and "DP 32" in out and "120 micro-batches" in out
    assert "stage 0 chunk 1 (virtual stage 15): 60 moe, 61-63 noop, [final-norm+output], [mtp x1]" in out
    assert "stage 0 chunk 0 (virtual stage 0): [embedding], 0-2 dense, 3 moe" in out


@pytest.mark.parametrize("args,needle", [
    (["--pipeline-model-parallel-size", "4", "--num-layer-list", "15,15,16"], "--num-layer-list"),
    (["--expert-model-parallel-size", "7"], "--expert-model-parallel-size 7"),
    (["--tensor-model-parallel-siz", "2"], "--tensor-model-parallel-siz"),  # typo: no abbreviation matching
    (["--num-layers", "64", "--noop-layers", "61,62"], "--noop-layers"),
    (["--schedules-method", "zbv"], "--schedules-method"),
])
def test_cli_fails_naming_the_flag(args, needle):
    r = run_cli("--model-config", "assets/deepseek3_671b", *args)
    assert r.returncode == 2
    assert needle in r.stderr, r.stderr


def test_671b_config_asset(cfg671):
    from transformers import DeepseekV3Config

    c = DeepseekV3Config.from_pretrained(os.path.join(REPO, "assets/deepseek3_671b"))
    expect = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                  num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                  qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=256,
                  n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
                  routed_scaling_factor=2.5, max_position_embeddings=163840, model_type="deepseek_v3")
    for k, v in expect.items():
        assert getattr(c, k) == v, k
    assert cfg671["num_nextn_predict_layers"] == 1
    rp = c.rope_parameters
    assert rp["rope_type"] == "yarn" and rp["factor"] == 40 and rp["original_max_position_embeddings"] == 4096
    assert (rp["beta_fast"], rp["beta_slow"], rp["mscale"], rp["mscale_all_dim"], rp["rope_theta"]) == (32, 1, 1, 1, 10000)
    tiny = set(__import__("json").load(open(os.path.join(REPO, "assets/tiny_deepseek3/config.json"))))
    assert tiny - set(cfg671) <= {"pad_token_id"}  # same key names as the tiny config


def test_qlora_prices_only_quantized_weights_as_nf4(cfg671):
    """Only the LoRA-targeted linears are NF4: a larger vocabulary adds embedding + output rows at 2 bytes (bf16)
    each under QLoRA exactly as under LoRA; MTP's eh_proj (not a LoRA target) is not NF4 either."""
    lay = dict(tp=1, pp=1, ep=1, num_layers=61, mtp_num_layers=1)
    args = [TrainArgs(lora_r=8, qlora_nf4=q, world_size=1, global_batch_size=1) for q in (False, True)]

    def weights(cfg, train):
        return make_plan(cfg, ParallelLayout(**lay), train).stages[0].memory.weights

    bigger = dict(cfg671, vocab_size=cfg671["vocab_size"] + 1000)
    for train in args:
        assert weights(bigger, train) - weights(cfg671, train) == pytest.approx(2 * 1000 * 7168 * 2)
    # LoRA -> QLoRA saves 2 - 0.5625 bytes per targeted weight, minus the one dequantized layer it keeps
    # (the largest linear: a dense layer's fc1, 2 x 18432 x 7168), and nothing on the embedding/output/eh_proj.
    from mindspeed_dsv.peft.lora import LORA_TARGET_MODULES  # the names training can adapt and quantize
    from mindspeed_dsv.plan import NF4_BYTES_PER_PARAM

    plan = make_plan(cfg671, ParallelLayout(**lay), args[0])
    targeted = sum(t.numel for t in _tensors_of(plan, cfg671) if t.name.rsplit(".", 1)[-1] in LORA_TARGET_MODULES)
    saved = weights(cfg671, args[0]) - weights(cfg671, args[1])
    assert saved == pytest.approx(targeted * (2 - NF4_BYTES_PER_PARAM) - 2 * 18432 * 7168 * 2)


def _tensors_of(plan, cfg):
    from mindspeed_dsv.plan import decoder_layer_tensors, embedding_tensors, model_shape, mtp_layer_tensors, output_tensors

    m = model_shape(cfg)
    out = embedding_tensors(m) + output_tensors(m) + mtp_layer_tensors(m)
    for i in range(m.num_hidden_layers):
        out += decoder_layer_tensors(m, dense=i < m.first_k_dense_replace)
    return out


def test_plan_simulates_the_schedules(cfg671):
    """The A2 pretrain template (PP8, 64 = 61 + noop 61,62,63, dualpipev, 240 micro-batches): the memory estimate
    uses the in-flight peak of the simulated dualpipev order, and the table compares 1F1B, VPP and dualpipev."""
    from mindspeed_dsv.pipeline_order import dualpipev_order, dualpipev_stage, simulate

    lay_kw, train_kw = TEMPLATES["pretrain_A2"]
    plan = make_plan(cfg671, ParallelLayout(**lay_kw), TrainArgs(**train_kw))
    assert plan.num_microbatches == 240
    assert [s.in_flight_microbatches for s in plan.stages] == [8.5] * 8  # (2 * PP + 1) half-chunks
    rows = {r.name: r for r in plan.schedules}
    assert set(rows) == {"1F1B", "interleaved 1F1B, 2 chunks", "dualpipev", "dualpipev + --moe-fb-overlap"}
    assert rows["dualpipev"].current
    # pairing a forward with a backward (--moe-fb-overlap) can only wait longer in a simulation where the
    # all-to-all it hides costs nothing; it keeps the in-flight peak
    fb = rows["dualpipev + --moe-fb-overlap"]
    assert rows["dualpipev"].bubble <= fb.bubble < rows["1F1B"].bubble
    assert fb.peak_in_flight == rows["dualpipev"].peak_in_flight
    assert rows["1F1B"].peak_in_flight == [8, 7, 6, 5, 4, 3, 2, 1]
    # uniform stages: the same simulation gives DualPipe's bubble, below 1F1B's (P-1)/(M+P-1)
    even = simulate([dualpipev_order(8, r, 240) for r in range(8)], lambda r, c: dualpipev_stage(8, r, c), 16)
    assert even.bubble < 7 / 247
    text = format_plan(plan)
    assert "pipeline schedules at PP 8, 240 micro-batches" in text and "<- this layout" in text

"""Flags are checked before anything is built: typos, contradictions, and disagreement with config.json."""


import pytest

from mindspeed_dsv.training.arguments import ArgumentError, build_parser, validate
from tests.model.hf_reference import tiny_hf_config

BASE = ["--model-config", "assets/tiny_deepseek3", "--data-path", "x", "--seq-length", "64", "--train-iters", "10"]


def _check(*flags, world=1):
    args = build_parser().parse_args([*BASE, *flags])
    return validate(args, world, tiny_hf_config())


def test_valid_flags_give_the_layout():
    layout = _check("--tensor-model-parallel-size", "2", "--sequence-parallel", "--micro-batch-size", "2", world=4)
    assert (layout.tp, layout.num_layers, layout.num_experts, layout.mtp_num_layers) == (2, 4, 8, 1)


def test_typo_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--tensor-model-parallel-siz", "2"])
    assert "--tensor-model-parallel-siz" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,world,message",
    [
        (["--lr-warmup-iters", "10"], 1, "--lr-warmup-iters 10 must be below"),
        (["--min-lr", "1", "--lr", "0.1"], 1, "--min-lr 1.0 is above --lr 0.1"),
        (["--recompute-method", "uniform"], 1, "--recompute-method needs --recompute-granularity full"),
        (["--lora-target-modules", "linear_proj"], 1, "need --lora-r > 0"),
        (["--lora-r", "8"], 1, "--lora-r needs --lora-target-modules"),
        (["--lora-r", "8", "--lora-target-modules", "linear_proj", "--qlora-nf4", "--save", "out"], 1,
         "--qlora-nf4 with --save needs --lora-ckpt-filter"),
        (["--save-interval", "5"], 1, "--save-interval needs --save"),
        (["--hidden-size", "256"], 1, "--hidden-size 256 differs from config.json hidden_size=128"),
        (["--global-batch-size", "3", "--micro-batch-size", "2"], 2, "not a multiple of --micro-batch-size 2"),
        (["--tensor-model-parallel-size", "2"], 2, "needs --sequence-parallel"),
        (["--expert-model-parallel-size", "3"], 3, "3 must divide"),
        (["--pipeline-model-parallel-size", "2", "--num-layer-list", "1,2"], 2, "--num-layer-list 1,2 sums to 3"),
        (["--schedules-method", "dualpipev", "--pipeline-model-parallel-size", "2"], 2,
         "dualpipev needs at least 2 * --pipeline-model-parallel-size = 4 micro-batches per step; "
         "--global-batch-size 1 / (--micro-batch-size 1 * data-parallel size 1) = 1"),
        (["--schedules-method", "dualpipev", "--pipeline-model-parallel-size", "4", "--global-batch-size", "8"], 4,
         "needs --num-layers (4) divisible by 2 * --pipeline-model-parallel-size (8); pad with --noop-layers"),
        (["--moe-fb-overlap", "--expert-model-parallel-size", "2"], 2,
         "--moe-fb-overlap needs --schedules-method dualpipev"),
        (["--moe-fb-overlap", "--schedules-method", "dualpipev", "--pipeline-model-parallel-size", "2",
          "--global-batch-size", "4"], 2, "--moe-fb-overlap needs experts spread over >= 2 ranks"),
        (["--moe-fb-overlap", "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "allgather"], 2,
         "--moe-fb-overlap needs --moe-token-dispatcher-type alltoall"),
        (["--schedules-method", "dualpipev", "--global-batch-size", "4"], 1,
         "dualpipev needs --pipeline-model-parallel-size > 1 (got 1)"),
        (["--schedules-method", "dualpipev", "--pipeline-model-parallel-size", "2", "--global-batch-size", "4",
          "--num-layers-per-virtual-pipeline-stage", "1"], 2, "cannot be used with --num-layers-per-virtual"),
        (["--train-iters", "0"], 1, "--train-iters must be > 0, got 0"),
        (["--lr=-0.1"], 1, "--lr must be >= 0, got -0.1"),
        (["--micro-batch-size", "0"], 1, "--micro-batch-size must be > 0, got 0"),
        (["--adam-beta2", "1.0"], 1, "--adam-beta2 must be in [0, 1), got 1.0"),
        (["--use-fused-moe-token-permute-and-unpermute", "--moe-token-dispatcher-type", "allgather"], 1,
         "--use-fused-moe-token-permute-and-unpermute needs --moe-token-dispatcher-type alltoall"),
    ],
)
def test_contradictions_name_the_flags(flags, world, message):
    with pytest.raises((ArgumentError, ValueError)) as err:
        _check(*flags, world=world)
    assert message in str(err.value), str(err.value)


def test_dualpipev_refuses_tied_embeddings():
    args = build_parser().parse_args([*BASE, "--schedules-method", "dualpipev", "--pipeline-model-parallel-size", "2",
                                      "--global-batch-size", "4"])
    with pytest.raises(ArgumentError) as err:
        validate(args, 2, tiny_hf_config(tie_word_embeddings=True))
    assert "dualpipev needs untied embeddings, but config.json has tie_word_embeddings true" in str(err.value)


def test_dualpipev_with_noop_padding_is_accepted():
    layout = _check("--schedules-method", "dualpipev", "--pipeline-model-parallel-size", "4", "--global-batch-size",
                    "8", "--num-layers", "8", "--noop-layers", "4,5,6,7", world=4)
    assert layout.dualpipev and layout.stage_layers(0, 1) == [7]

def test_fused_permute_is_accepted_at_any_ep_with_either_expert_kind():
    """Our dispatchers serve EP=1 and EP>1, grouped experts and SequentialMLP (tests/model/test_alltoall_dispatcher)."""
    for flags, world in ((["--expert-model-parallel-size", "2"], 2), (["--moe-grouped-gemm"], 1)):
        _check("--use-fused-moe-token-permute-and-unpermute", *flags, world=world)

"""`tfx plan`: the 7B config plans on the meta device (no weights) with the method's numbers."""

from conftest import run_tfx


def test_plan_7b_on_64_gpus():
    result = run_tfx("plan", "configs/tokenflex-7b.yaml", "--nodes", "8", "--gpus-per-node", "8",
                     timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "grid 27x27" in out  # SigLIP-so400m-patch14-384: the patch conv floors 384/14
    assert "| projector | 20.4M |" in out  # method notes: ~20.4M at C=1152, D=3584
    assert "| llm | 7,614.7M |" in out  # Qwen2.5-7B with its 151,936-token vocabulary + 4
    assert "ZeRO-3 model states on 64 GPUs" in out
    for n in ("| 64 | 0.20 |", "| 144 | 0.30 |", "| 256 | 0.50 |", "| mean |"):
        assert n in out

"""The examples' offline default (built-in tiny encoders on embedded scenes) runs end to end."""

import json

import pytest

from diff3r_plugin.integration.upstream import example_main


@pytest.mark.parametrize("repo,kind", [("mvsplat", "pose_given"), ("noposplat", "pose_free")])
def test_builtin_example_runs(repo, kind, capsys):
    code = example_main(repo, kind, "example", ["--json", "--steps", "1", "--image-size", "32",
                                                "--tto-steps", "1", "--eval-scenes", "1"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["upstream"] is None and out["steps"] == 1
    assert len(out["losses"]) == 1 and 0 < out["losses"][0] < 1
    assert out["encoder_params_with_grad"] > 0 and out["head_params_with_grad"] > 0
    assert out["state_dict_keys_unchanged"] is True
    for method in ("zero_shot", "diff3r_tto"):
        assert 5 < out["eval"][method]["psnr"] < 60
        assert 0 < out["eval"][method]["ssim"] <= 1


def test_repo_without_upstream_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        example_main("mvsplat", "pose_given", "example", ["--repo", "depthsplat"])
    assert exc.value.code == 2
    assert "--repo" in capsys.readouterr().err


def test_unknown_repo_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        example_main("mvsplat", "pose_given", "example", ["--repo", "anysplat", "--upstream", "/nowhere"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "anysplat" in err and "depthsplat" in err

"""Settings from flags and FUNASR_NANO_MCP_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.__main__ import main
from server.config import ConfigError, Settings, build_parser, load_settings


def test_defaults_are_safe():
    s = load_settings([], env={})
    assert s == Settings()
    assert s.allowed_roots == (Path.home(),) and not s.allow_hidden
    assert s.url_policy == "public" and s.url_allow_hosts == ()
    assert s.client_roots == "narrow" and s.call_budget_s == 45 and s.queue_size == 16
    assert s.model is None and s.quantize is None and s.dtype == "auto" and s.encoder_dtype == "float32"
    assert s.batch_size == 16


def test_batch_size_from_flag_and_environment():
    assert load_settings(["--batch-size", "4"], env={}).batch_size == 4
    assert load_settings([], env={"FUNASR_NANO_MCP_BATCH_SIZE": "64"}).batch_size == 64
    for bad in ("0", "257", "many"):
        with pytest.raises(ConfigError, match="batch-size"):
            load_settings(["--batch-size", bad], env={})


def test_environment_and_flags(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    env = {
        "FUNASR_NANO_MCP_MODEL": "mlx-community/Fun-ASR-Nano",
        "FUNASR_NANO_MCP_ALLOWED_ROOTS": os.pathsep.join([str(a), str(b)]),
        "FUNASR_NANO_MCP_URL_ALLOW_HOSTS": "NAS.local., 192.168.1.5",
        "FUNASR_NANO_MCP_QUANTIZE": "4",
        "FUNASR_NANO_MCP_WARMUP": "off",
        "FUNASR_NANO_MCP_MAX_DURATION_S": "600",
        "FUNASR_NANO_MCP_CALL_BUDGET_S": "30",
        "FUNASR_NANO_MCP_ENCODER_DTYPE": "bfloat16",
    }
    s = load_settings([], env=env)
    assert s.model == "mlx-community/Fun-ASR-Nano" and s.allowed_roots == (a, b)
    assert s.url_allow_hosts == ("nas.local", "192.168.1.5") and s.quantize == 4 and s.warmup is False
    assert s.max_duration_s == 600 and s.call_budget_s == 30 and s.encoder_dtype == "bfloat16"
    s = load_settings(["--model", "/m", "--allowed-root", str(b), "--quantize", "none", "--warmup",
                       "--url-policy", "allowlist", "--url-allow-host", "x.test", "--max-file-mb", "5"], env=env)
    assert s.model == "/m" and s.allowed_roots == (b,) and s.quantize is None and s.warmup is True
    assert s.url_policy == "allowlist" and s.url_allow_hosts == ("x.test",) and s.max_file_bytes == 5 * 2**20


@pytest.mark.parametrize("argv, env, expected", [
    (["--dtype", "int3"], {}, "--dtype"),
    (["--quantize", "3"], {}, "--quantize"),
    (["--encoder-dtype", "float16"], {}, "--encoder-dtype"),
    (["--allowed-root", "relative/dir"], {}, "absolute"),
    (["--url-policy", "sometimes"], {}, "--url-policy"),
    (["--call-budget-s", "-1"], {}, "--call-budget-s"),
    ([], {"FUNASR_NANO_MCP_WARMUP": "perhaps"}, "FUNASR_NANO_MCP_WARMUP"),
    ([], {"FUNASR_NANO_MCP_QUEUE_SIZE": "lots"}, "--queue-size"),
])
def test_bad_values_name_the_setting(argv, env, expected):
    with pytest.raises(ConfigError) as info:
        load_settings(argv, env=env)
    assert expected in str(info.value)


def test_every_flag_names_its_variable():
    text = build_parser().format_help()
    for field in Settings.model_fields:
        assert "FUNASR_NANO_MCP_" + field.upper() in text, field


def test_help_version_and_errors_stay_off_stdout(capsys, monkeypatch):
    main(["--help"])
    main(["--version"])
    monkeypatch.setenv("FUNASR_NANO_MCP_DTYPE", "int3")
    with pytest.raises(SystemExit) as info:
        main([])
    out, err = capsys.readouterr()
    assert info.value.code == 2
    assert out == ""
    assert "FUNASR_NANO_MCP_ALLOWED_ROOTS" in err and "funasr-nano-mcp 0.1.0" in err and "configuration error" in err

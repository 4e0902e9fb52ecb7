from test_cli import imports_torch, qgpt_importtime


def test_models_reads_headers_without_torch(tiny_hf):
    result = qgpt_importtime("models", str(tiny_hf[1]))
    assert result.returncode == 0 and str(tiny_hf[1]) in result.stdout
    assert not imports_torch(result)

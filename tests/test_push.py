"""twigvlm-push: --dry-run lists the folder's files; the upload goes through huggingface_hub with the HTTP layer replaced."""

import base64
import json

import httpx2
import pytest
from huggingface_hub import set_client_factory
from huggingface_hub.utils._http import default_client_factory

from twigvlm.conversion.push import main


FILES = ["README.md", "config.json", "generation_config.json", "model.safetensors", "modeling_twigvlm.py", "sub/extra.txt"]


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "twigvlm-tiny"
    for name in FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps({"model_type": "twigvlm"}) if name == "config.json" else f"content of {name}")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("")
    return folder


def test_dry_run_lists_the_files(folder, capsys):
    main([str(folder), "--repo-id", "someone/twigvlm-tiny", "--dry-run"])
    out = capsys.readouterr().out
    assert "Would upload 6 files to someone/twigvlm-tiny@main" in out
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed == FILES


def test_refuses_a_folder_that_is_not_twigvlm(folder, capsys):
    (folder / "README.md").unlink()
    with pytest.raises(SystemExit):
        main([str(folder), "--repo-id", "someone/twigvlm-tiny", "--dry-run"])
    assert "lacks README.md" in capsys.readouterr().err


@pytest.fixture
def hub(monkeypatch):
    """A fake Hub behind huggingface_hub's HTTP client: records requests, answers what an upload needs."""
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_for_tests")
    requests = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        requests.append(request)
        path = request.url.path
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/someone/twigvlm-tiny"})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/someone/twigvlm-tiny/commit/abc",
                                               "commitOid": "abc"})
        if "/branch/" in path or path == "/api/validate-yaml":  # huggingface_hub checks a README's front matter
            return httpx2.Response(200, json={})
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})

    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handle)))
    yield requests
    set_client_factory(default_client_factory)


def test_upload_through_huggingface_hub(folder, hub, capsys):
    main([str(folder), "--repo-id", "someone/twigvlm-tiny", "--revision", "v1", "--private", "--commit-message", "First"])
    create = next(r for r in hub if r.url.path == "/api/repos/create")
    payload = json.loads(create.content)
    assert (payload["name"], payload["organization"], payload["visibility"]) == ("twigvlm-tiny", "someone", "private")
    assert any(r.url.path == "/api/models/someone/twigvlm-tiny/branch/v1" for r in hub)
    commit = next(r for r in hub if "/commit/" in r.url.path)
    assert commit.url.path == "/api/models/someone/twigvlm-tiny/commit/v1"
    lines = [json.loads(line) for line in commit.content.decode().splitlines()]
    assert lines[0]["value"]["summary"] == "First"
    uploaded = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines[1:]}
    assert sorted(uploaded) == FILES
    assert uploaded["model.safetensors"] == b"content of model.safetensors"
    assert all(r.headers["authorization"] == "Bearer hf_secret_token_for_tests" for r in hub)
    out = capsys.readouterr()
    assert "hf_secret_token_for_tests" not in out.out + out.err

"""Every shipped config is checked here, so a typo fails CI instead of a cluster: bertray configs in jobs/configs
validate, jobs/runtime_env.yaml agrees with pyproject.toml, the cluster-launcher YAML passes the JSON schema that
ships inside Ray, and the KubeRay manifests use the pinned Ray, entrypoints that exist, sane resources."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bertray import cli, runtime
from bertray import config as C

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
CLUSTER_YAMLS = sorted((REPO / "cluster").glob("*.yaml"))
JOB_FILES = sorted((REPO / "jobs").glob("*.py"))
STAGES = ("pretrain", "finetune", "tune", "label", "serve")
TRAINING_STAGES = ("pretrain", "finetune", "tune", "label")  # the ones with a RayJob; serve has a RayService
LAUNCH_WORDS = ("bertray ", "ray job submit", "ray up", "kubectl ", "serve deploy", "make ", "cluster/local_cluster.sh")


def _pins() -> dict[str, str]:
    """{distribution name: version} of pyproject.toml's dependencies (extras dropped)."""
    # The [project] dependencies list, read without tomllib (Python 3.11+; the package supports 3.10).
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    deps = re.findall(r'^\s*"([^"]+)"', block, re.M)
    assert deps, "pyproject.toml: no dependencies found"
    pins = {}
    for d in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)", d)
        assert m, f"pyproject.toml: {d!r} is not pinned with =="
        pins[m.group(1).lower()] = m.group(3)
    return pins


RAY_VERSION = _pins()["ray"]
IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"


def _pip_packages(runtime_env: dict) -> dict[str, str]:
    pip = runtime_env["pip"]
    packages = pip["packages"] if isinstance(pip, dict) else pip
    return {p.split("==")[0].lower(): p.split("==")[1] for p in packages}


def _assert_pip_matches_pyproject(runtime_env: dict, where: str) -> None:
    want = {k: v for k, v in _pins().items() if k != "ray"}  # Ray comes with the image; never reinstall it
    assert _pip_packages(runtime_env) == want, f"{where}: pip pins differ from pyproject.toml"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --------------------------------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", [*CONFIGS, *CLUSTER_YAMLS, REPO / "jobs" / "runtime_env.yaml"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path):
    assert _docs(path), f"{path}: empty"


@pytest.mark.parametrize("path", [*CONFIGS, *CLUSTER_YAMLS, *JOB_FILES, REPO / "jobs" / "runtime_env.yaml"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_file_starts_with_the_command_that_launches_it(path):
    first = path.read_text().splitlines()[0]
    if first.startswith("#!"):  # a script: the comment follows the shebang
        first = path.read_text().splitlines()[1]
    assert first.startswith("#") and any(w in first for w in LAUNCH_WORDS), f"{path}: first line {first!r}"


# --------------------------------------------------------------------------------------------------- bertray configs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_bertray_config_validates(path):
    stage = cli.detect_stage(str(path))
    if stage == "tune" and not hasattr(C, "TuneConfig"):
        pytest.skip("bertray.config.TuneConfig does not exist yet")
    cli.build_config(stage, str(path), [], {})  # raises ConfigError listing every problem


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.endswith("-local.yaml") or p.name.startswith("demo-")],
                         ids=lambda p: p.name)
def test_local_config_inputs_exist(path):
    """Local configs run from a checkout: their data paths must be in the repo (models under runs/ are the
    outputs of an earlier stage, named in the file's header)."""
    raw = yaml.safe_load(path.read_text())
    paths = [raw.get("input"), *(raw.get("data", {}).get(k) for k in ("train", "validation"))]
    base = raw.get("model", {}).get("base") if isinstance(raw.get("model"), dict) else raw.get("model")
    paths.append(base)
    for p in paths:
        if not p or "://" in p or p == "embedded" or p.startswith(("runs/", "./runs/")):
            continue
        assert (REPO / p).exists(), f"{path.name}: {p} does not exist in the repo"


def test_cluster_configs_use_shared_storage_and_gpus():
    """The cluster variants are what a multi-node cluster needs: S3 everywhere, GPUs, mixed precision auto."""
    for name in ("sst2-finetune.yaml", "pretrain.yaml", "tune.yaml"):
        raw = yaml.safe_load((REPO / "jobs" / "configs" / name).read_text())
        assert raw["run"]["storage"].startswith("s3://"), name
        assert raw["data"]["train"].startswith("s3://"), name
        assert raw["train"]["mixed_precision"] == "auto", name
        assert raw.get("run", {}).get("use_gpu") or raw.get("search", {}).get("gpus_per_trial"), name
    label = yaml.safe_load((REPO / "jobs" / "configs" / "label.yaml").read_text())
    assert all(label[k].startswith("s3://") for k in ("model", "input", "output"))


# --------------------------------------------------------------------------------------------------- jobs/


def test_one_job_file_per_stage():
    assert sorted(p.stem for p in JOB_FILES) == sorted(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_job_file_is_the_cli(stage):
    """`python jobs/<stage>.py` is `bertray <stage>`: same parser, same flags; its --config exists and validates."""
    path = REPO / "jobs" / f"{stage}.py"
    first = path.read_text().splitlines()[0]
    cmd = shlex.split(first.removeprefix("# Launch:"))
    assert cmd[:7] == ["ray", "job", "submit", "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml"], first
    assert cmd[7:10] == ["--", "python", f"jobs/{stage}.py"], first
    config = cmd[cmd.index("--config") + 1]
    if stage != "tune" or hasattr(C, "TuneConfig"):
        cli.build_config(stage, str(REPO / config), [], {})
    out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120,
                         cwd="/")  # from anywhere: the file finds the repo itself
    assert out.returncode == 0, out.stderr
    assert f"usage: bertray {stage}" in out.stdout and "--set KEY=VALUE" in out.stdout


def test_runtime_env_ships_the_code_and_the_pins(monkeypatch):
    renv = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    # Every folder git ignores (virtualenv, runs, prepared wheels...) stays out of the upload, and .git too.
    ignored = [line.strip().lstrip("/") for line in (REPO / ".gitignore").read_text().splitlines()
               if line.strip().endswith("/") and not line.startswith("#")]
    for d in (".git/", *ignored):
        assert d in renv["excludes"], d
    assert "working_dir" not in renv  # given by `ray job submit --working-dir .`
    _assert_pip_matches_pyproject(renv, "jobs/runtime_env.yaml")
    # Ray refuses a job whose runtime env and the driver's ray.init() set the same variable, and the CLI forwards
    # some variables from the driver to the workers itself.
    for key in renv.get("env_vars", {}):
        monkeypatch.setenv(key, "x")
        assert key not in runtime.worker_env(), f"env_vars.{key} would clash with what bertray forwards"


# --------------------------------------------------------------------------------------------------- cluster launcher


def test_cluster_launcher_yaml_validates_against_rays_schema():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(cfg))  # Ray's own check, after it fills in the AWS defaults
    assert cfg["provider"]["type"] == "aws"
    assert cfg["docker"]["image"] == IMAGE
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])
    workers = [t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in workers)
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU instance families
    assert all(t["min_workers"] == 0 for t in workers)
    # The synced checkout is installed with pyproject.toml's pins.
    assert cfg["file_mounts"] == {"/home/ray/bertray": "."} and ".venv" in cfg["rsync_exclude"]
    assert any("pip install" in c and "/home/ray/bertray" in c for c in cfg["setup_commands"])


# --------------------------------------------------------------------------------------------------- KubeRay


def _quantity(q) -> float:
    """A Kubernetes resource quantity as a number: '500m' -> 0.5, '16Gi' -> 17179869184, '2G' -> 2e9."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)([A-Za-z]*)", str(q))
    assert m and m.group(2) in ("", *units), f"not a resource quantity: {q!r}"
    return float(m.group(1)) * units.get(m.group(2), 1)


def _manifests() -> list[tuple[Path, dict]]:
    return [(p, d) for p in CLUSTER_YAMLS for d in _docs(p) if str(d.get("apiVersion", "")).startswith("ray.io/")]


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def test_kuberay_manifests_are_present():
    kinds = [(p.name, d["kind"]) for p, d in _manifests()]
    assert ("raycluster.yaml", "RayCluster") in kinds and ("rayservice.yaml", "RayService") in kinds
    entrypoints = [d["spec"]["entrypoint"] for _, d in _manifests() if d["kind"] == "RayJob"]
    for stage in TRAINING_STAGES:
        assert any(f"jobs/{stage}.py" in e for e in entrypoints), f"no RayJob runs jobs/{stage}.py"


@pytest.mark.parametrize("path,doc", _manifests(), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_kuberay_cluster_spec(path, doc):
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob", "RayService")
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == RAY_VERSION, f"{path.name}: rayVersion {spec['rayVersion']} != pinned {RAY_VERSION}"
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must run no work"
    groups = spec["workerGroupSpecs"]
    assert groups
    pods = [("head", head["template"]["spec"])] + [(g["groupName"], g["template"]["spec"]) for g in groups]
    for name, pod in pods:
        for c in pod["containers"]:
            assert c["image"] == IMAGE, f"{path.name}/{name}: image {c['image']} (want {IMAGE})"
            req, lim = c["resources"]["requests"], c["resources"]["limits"]
            for key, value in req.items():
                assert key in lim, f"{path.name}/{name}: {key} requested without a limit"
                assert _quantity(value) <= _quantity(lim[key]), f"{path.name}/{name}: {key} request > limit"
    for g in groups:
        lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert _quantity(lim.get("nvidia.com/gpu", 0)) >= 1, f"{path.name}/{g['groupName']}: no nvidia.com/gpu limit"
        assert g["minReplicas"] == 0 and g["replicas"] == 0 and g["maxReplicas"] >= 1, "GPU workers start at zero"
        assert any(t.get("key") == "nvidia.com/gpu" for t in g["template"]["spec"].get("tolerations", []))


@pytest.mark.parametrize("path,doc", [(p, d) for p, d in _manifests() if d["kind"] == "RayJob"],
                         ids=lambda x: x.name if isinstance(x, Path) else "")
def test_rayjob(path, doc):
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert isinstance(spec["submitterConfig"]["backoffLimit"], int) and spec["submitterConfig"]["backoffLimit"] >= 0
    # The entrypoint runs from the working_dir, a copy of this repo: every file it names must exist here.
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "python" and re.fullmatch(r"jobs/(\w+)\.py", words[1]), spec["entrypoint"]
    stage = words[1][len("jobs/"):-len(".py")]
    files = [w for w in words[1:] if w.endswith((".py", ".yaml"))]
    for f in files:
        assert (REPO / f).is_file(), f"{path.name}: entrypoint names {f}, which is not in the repo"
    config = words[words.index("--config") + 1]
    if stage != "tune" or hasattr(C, "TuneConfig"):
        cli.build_config(stage, str(REPO / config), [], {})
    renv = yaml.safe_load(spec["runtimeEnvYAML"])
    assert renv["working_dir"].startswith(("https://", "s3://", "gs://")), "a RayJob needs a remote working_dir"
    _assert_pip_matches_pyproject(renv, path.name)


def test_rayservice_matches_serve_config():
    doc = next(d for _, d in _manifests() if d["kind"] == "RayService")
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert app["import_path"] == "bertray.serve:app_builder" and (REPO / (module.replace(".", "/") + ".py")).is_file()
    C.load(C.ServeConfig, data=app["args"])  # the args are a valid ServeConfig
    _assert_pip_matches_pyproject(app["runtime_env"], "rayservice.yaml")
    assert serve_cfg["http_options"]["port"] == 8000
    standalone = REPO / "cluster" / "serve_config.yaml"
    if standalone.exists():  # the `serve deploy` file: same application, same settings
        (other,) = yaml.safe_load(standalone.read_text())["applications"]
        assert other["import_path"] == app["import_path"]
        assert {k: v for k, v in app["args"].items() if k != "api_key_env"} == \
               {k: v for k, v in other["args"].items() if k != "api_key_env"}
    spec = _cluster_spec(doc)
    for pod in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
        env = {e["name"]: e for e in pod["template"]["spec"]["containers"][0].get("env", [])}
        # The key named by api_key_env reaches every pod from a Secret.
        if app["args"].get("api_key_env"):
            assert "secretKeyRef" in env[app["args"]["api_key_env"]]["valueFrom"]
        # The ingress bertray serve has by default: Serve reads it from each node's environment, not the app's.
        assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1"

"""deploy/*.yaml checked offline with SkyPilot's own validation (no cloud credentials, no network).

Two layers: the JSON schemas SkyPilot validates task / resources / service sections with, and a full
``sky.Task.from_yaml`` parse in a subprocess whose HOME holds a stand-in SkyPilot catalog (SkyPilot would
otherwise download its instance catalog; the rows carry the published vCPU / memory of our instance
types), which also gives SkyPilot's own mapping of disk tiers to GCP disk types. Then the run script is
executed with a stub python to check the thread count follows the machine's vCPUs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sky.serve.service_spec import SkyServiceSpec
from sky.utils import common_utils, schemas

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
YAMLS = ["gcp_c3d.yaml", "gcp_h3.yaml", "runpod_cpu.yaml", "service.yaml"]
INSTANCE = {"gcp_c3d.yaml": "c3d-standard-90", "gcp_h3.yaml": "h3-standard-88",
            "runpod_cpu.yaml": "cpu5c-8-16", "service.yaml": "c3d-standard-90"}
# boot disk types each GCP series accepts (GCP machine-series docs): neither takes pd-standard or pd-extreme
GCP_DISK_TYPES = {"c3d": {"pd-balanced", "pd-ssd", "hyperdisk-balanced"},
                  "h3": {"pd-balanced", "hyperdisk-balanced"}}
RUNPOD_DISK_GB_PER_VCPU = 10  # RunPod refuses a CPU pod's container disk above 10 GB per vCPU

# stand-in catalog rows: InstanceType, vCPUs, MemoryGiB, Region, AvailabilityZone
CATALOG = {
    "gcp": [("c3d-standard-90", 90, 360, "us-central1", "us-central1-a"),
            ("h3-standard-88", 88, 352, "us-central1", "us-central1-a")],
    "runpod": [("cpu5c-8-16", 8, 16, "CA", "CA-MTL-1")],
}
PARSE_SCRIPT = r"""
import json, sys
import sky
from sky.clouds import gcp
out = {}
for path in sys.argv[1:]:
    task = sky.Task.from_yaml(path)
    (res,) = task.resources
    item = {"cloud": str(res.cloud), "instance_type": res.instance_type, "cpus": res.cpus,
            "disk_size": res.disk_size, "disk_tier": res.disk_tier.value if res.disk_tier else None,
            "ports": res.ports, "use_spot": res.use_spot, "envs": task.envs, "workdir": task.workdir}
    if str(res.cloud) == "GCP":
        item["gcp_disk_type"] = gcp.GCP._get_disk_type(res.instance_type, res.disk_tier)
        item["gcp_disk_type_low"] = gcp.GCP._get_disk_type(res.instance_type, sky.resources.resources_utils.DiskTier.LOW)
    if task.service is not None:
        s = task.service
        item["service"] = {"path": s.readiness_path, "min": s.min_replicas, "max": s.max_replicas,
                           "qps": s.target_qps_per_replica}
    out[path.rsplit("/", 1)[-1]] = item
print("PARSED " + json.dumps(out))
"""


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", YAMLS)
def test_schemas_accept_yaml(name):
    config = load(name)
    common_utils.validate_schema(config, schemas.get_task_schema(), f"{name}: invalid task: ")
    common_utils.validate_schema(config["resources"], schemas.get_resources_schema(), f"{name}: invalid resources: ")
    if "service" in config:
        common_utils.validate_schema(config["service"], schemas.get_service_schema(), f"{name}: invalid service: ")


def test_schema_validation_is_live():
    """The same calls reject what SkyPilot rejects, so the test above is not vacuous."""
    bad = load("gcp_c3d.yaml")
    bad["resources"]["disk_sizee"] = 100
    with pytest.raises(ValueError):
        common_utils.validate_schema(bad["resources"], schemas.get_resources_schema(), "")
    with pytest.raises(ValueError):
        common_utils.validate_schema({**load("gcp_c3d.yaml"), "envs": {"PORT": 8080}}, schemas.get_task_schema(), "")


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("skyhome")
    header = "InstanceType,vCPUs,MemoryGiB,AcceleratorName,AcceleratorCount,GpuInfo,Region,AvailabilityZone,Price,SpotPrice"
    for cloud, rows in CATALOG.items():
        folder = home / ".sky" / "catalogs" / "v8" / cloud
        folder.mkdir(parents=True)
        lines = [header] + [f"{it},{cpu},{mem},,,,{region},{zone},1.0," for it, cpu, mem, region, zone in rows]
        (folder / "vms.csv").write_text("\n".join(lines) + "\n")
    gcp = home / ".sky" / "catalogs" / "v8" / "gcp"
    (gcp / "images.csv").write_text("ImageId,Tag,Region,OS,OSVersion,ImageSize,CreationDate\n")
    (gcp / "accelerator_quota_mapping.csv").write_text("Region,AcceleratorName,AcceleratorCount,QuotaName\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYPILOT", "SKY_"))}
    env = {k: v for k, v in env.items() if k.lower() not in {"no_proxy", "http_proxy", "https_proxy"}}
    dead = "http://127.0.0.1:9"  # any download attempt (e.g. SkyPilot's catalog) fails instead of leaving the machine
    env.update(HOME=str(home), SKY_RUNTIME_DIR=str(home), HTTP_PROXY=dead, HTTPS_PROXY=dead,
               SKYPILOT_DISABLE_USAGE_COLLECTION="1")
    done = subprocess.run([sys.executable, "-c", PARSE_SCRIPT, *[str(DEPLOY / n) for n in YAMLS]],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PARSED ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[0][len("PARSED "):])


@pytest.mark.parametrize("name", YAMLS)
def test_instance_type_ports_and_workdir(parsed, name):
    item = parsed[name]
    assert item["instance_type"] == INSTANCE[name]
    assert item["cloud"] == ("RunPod" if name.startswith("runpod") else "GCP")
    assert item["ports"] == [item["envs"]["PORT"]]  # the exposed port is the one the server listens on
    assert item["workdir"] == "."  # `sky launch` from the repo root uploads it; setup pip-installs it
    assert not item["use_spot"]  # on-demand by default; spot is opt-in (documented in the YAML)
    assert "spot" in (DEPLOY / name).read_text().lower()


@pytest.mark.parametrize("name", YAMLS)
def test_env_defaults(parsed, name):
    envs = parsed[name]["envs"]
    assert envs["MODEL_REPO"] == "microsoft/BitNet-b1.58-2B-4T"
    assert envs["QUANT_TYPE"] in {"i2_s", "tl2"}
    assert envs["NUM_THREADS"] == ""
    assert envs["CTX_SIZE"] == "8192" and envs["PORT"] == "8080" and envs["CACHE_VERSION"]


@pytest.mark.parametrize("name", ["gcp_c3d.yaml", "gcp_h3.yaml", "service.yaml"])
def test_gcp_disk_tier_is_accepted_by_series(parsed, name):
    item = parsed[name]
    series = item["instance_type"].split("-")[0]
    assert item["gcp_disk_type"] in GCP_DISK_TYPES[series]
    # why the tier must be explicit: SkyPilot maps `low` to pd-standard for these series, which GCP refuses
    assert item["gcp_disk_type_low"] not in GCP_DISK_TYPES[series]


def test_runpod_disk_within_limits(parsed):
    item = parsed["runpod_cpu.yaml"]
    assert item["disk_tier"] is None  # RunPod has no disk tiers
    (vcpus,) = [cpu for it, cpu, *_ in CATALOG["runpod"] if it == item["instance_type"]]
    assert item["disk_size"] <= RUNPOD_DISK_GB_PER_VCPU * vcpus


def test_service_spec(parsed):
    config = load("service.yaml")["service"]
    spec = SkyServiceSpec.from_yaml_config(config)
    assert spec.readiness_path == "/health"
    assert 1 <= spec.min_replicas < spec.max_replicas and spec.target_qps_per_replica > 0
    assert parsed["service.yaml"]["service"]["path"] == "/health"
    zero = {**config, "replica_policy": {**config["replica_policy"], "min_replicas": 0}}
    assert SkyServiceSpec.from_yaml_config(zero).min_replicas == 0  # the documented scale-to-zero variant
    assert "min_replicas: 0" in (DEPLOY / "service.yaml").read_text()


@pytest.mark.parametrize("name", YAMLS)
def test_setup_uses_shared_script(name):
    config = load(name)
    assert config["setup"].strip() == "bash deploy/setup.sh"
    assert (DEPLOY / "setup.sh").is_file()


STUB_PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "bitnet_py.hub" ]; then
  echo "hub offline=$HF_HUB_OFFLINE args=$*" >> "$STUB_LOG"; echo /models/fake.gguf; exit 0
fi
echo "serve $*" >> "$STUB_LOG"
echo "GOMP_SPINCOUNT=${GOMP_SPINCOUNT-unset}" > "$STUB_LOG.env"
"""


def _run_script(name: str, tmp_path: Path, num_threads: str, extra_env: dict | None = None) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    log = tmp_path / f"log-{num_threads or 'empty'}-{'-'.join(f'{k}{v}' for k, v in (extra_env or {}).items())}"
    envs = load(name)["envs"]
    inherited = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}  # ours
    env = {**inherited, **{k: str(v) for k, v in envs.items()}, "NUM_THREADS": num_threads,
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), **(extra_env or {})}
    subprocess.run(["bash", "-c", load(name)["run"]], cwd=REPO_ROOT, env=env, check=True, timeout=60)
    return log.read_text().splitlines()


@pytest.mark.parametrize("name", YAMLS)
def test_run_threads_follow_vcpus(name, tmp_path):
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    hub_line, serve_line = _run_script(name, tmp_path, "")
    assert "offline=1" in hub_line and "microsoft/BitNet-b1.58-2B-4T --quant-type" in hub_line
    args = serve_line.split()
    assert args[:2] == ["serve", "serve.py"] and "--no-mmap" not in args  # NO_MMAP defaults to 0
    flags = dict(zip(args[2::2], args[3::2]))
    assert flags == {"--model": "/models/fake.gguf", "--threads": nproc, "--ctx-size": "8192",
                     "--host": "0.0.0.0", "--port": "8080"}
    _, serve_line = _run_script(name, tmp_path, "3")
    assert "--threads 3 " in serve_line
    _, serve_line = _run_script(name, tmp_path, "3", {"NO_MMAP": "1"})
    assert serve_line.split()[-1] == "--no-mmap"


@pytest.mark.parametrize("name", YAMLS)
def test_dedicated_vms_keep_openmp_threads_spinning(name, tmp_path):
    """The GCP VMs run only the server: its OpenMP threads spin through a step's Python (kernels/config.py);
    a RunPod pod (a container on a shared host) keeps the polite default."""
    _run_script(name, tmp_path, "")
    (log,) = tmp_path.glob("log-empty-*.env")
    expected = "unset" if name.startswith("runpod") else "1000000"
    assert log.read_text().strip() == f"GOMP_SPINCOUNT={expected}"

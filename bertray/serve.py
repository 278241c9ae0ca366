"""`bertray serve`: a classifier checkpoint behind Ray Serve, with dynamic batching, an HTTP API and a web page.

    bertray serve --model runs/sst2/model --port 8000       # then open http://127.0.0.1:8000/ (API docs at /docs)
    serve deploy cluster/serve_config.yaml                   # the same app on a running cluster or a KubeRay RayService

One FastAPI ingress deployment holds the model, loaded once per replica. Each request is checked on its own, so a
bad text fails only its request, with a 4xx naming it. The texts of concurrent requests go to one continuous
batcher (bertray.batching): a pass takes everything queued, and `Predictor` orders it by length so little compute
goes to padding. Bounded `max_ongoing_requests` / `max_queued_requests` turn overload into a fast 503
instead of an ever longer queue.

Requests enter through Serve's HAProxy ingress by default (ServeConfig.ingress): HAProxy forwards them to an HTTP
server inside each replica. Ray's Python proxy actor, the alternative, costs several ms of CPU per request and
calls back for each body, which on a small machine took the CPU that batching saves.
"""
# No `from __future__ import annotations`: FastAPI must see real types (Request, ...) on the route methods after
# serve.ingress has rebuilt them, not strings.
import hmac
import ipaddress
import json
import logging
import os
import signal
import tempfile
import time
from importlib import resources

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError
from ray import serve
from ray.serve import Application

from bertray import modeling, storage
from bertray.batching import Batcher
from bertray.config import SERVE_CPU_TOKEN_BUDGET, ConfigError, ServeConfig, load
from bertray.data import invalid_text
from bertray.runtime import free_ports

# Longest a JSON encoding of one character can be: a non-BMP character written as two \uXXXX escapes.
_MAX_JSON_BYTES_PER_CHAR = 12
_BODY_SLACK_BYTES = 64 * 1024  # keys, quotes, commas and whitespace around the texts
_ERRORS_SHOWN = 5  # a list of 1,000 ints gives 1,000 pydantic errors; the first few say enough
# Serve's controller gives a starting HTTP proxy three ready checks of this many seconds (Ray's default is 5) before
# it kills the proxy and starts another, while serve.start waits up to 60 s on the first proxy only. On a busy node
# the proxy took longer than that to import and bind (CI: 2 cores, a multi-node Ray cluster starting beside it) and
# serve.start failed with ActorDiedError; three tries cover serve.start's whole wait.
_PROXY_READY_CHECK_S = "20"
_HAPROXY_DRAIN_S = "2"

log = logging.getLogger(__name__)


class ServeStartError(RuntimeError):
    """Ray Serve's HTTP proxy did not come up."""


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Defaults of None, not Optional types: an explicit null is still "not a list", as a caller should hear.
    texts: list[StrictStr] = Field(
        None, description="texts to classify (1 to max_texts, each at most max_text_chars); a pair model takes pairs",
        examples=[["a gripping, beautifully acted film", "dull and far too long"]])
    pairs: list[tuple[StrictStr, StrictStr]] = Field(
        None, description="for a model trained on sentence pairs: [first, second] texts (1 to max_texts)",
        examples=[[["A man is playing a guitar.", "Someone plays an instrument."]]])
    probabilities: StrictBool = Field(False, description="also return the probability of every class")


class Prediction(BaseModel):
    label: str | None = Field(None, description="single-label models: the most probable class")
    score: float | None = Field(None, description="probability of `label`")
    labels: list[str] | None = Field(None, description="multi-label models: every label at or over its threshold, "
                                                       "most probable first (may be empty)")
    scores: list[float] | None = Field(None, description="probability of each of `labels`")
    probabilities: dict[str, float] | None = Field(None, description="every class's probability, if asked for")


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]
    model: str


_ERROR_RESPONSES = {
    400: {"description": "body is not valid JSON"},
    401: {"description": "missing or wrong API key (only when the server has one)"},
    413: {"description": "too many texts, a text too long, or a body too large"},
    415: {"description": "the body is not sent as application/json"},
    422: {"description": "well-formed JSON of the wrong shape: a missing field, a wrong type, an empty list or text, "
                 "a text that is not valid Unicode"},
    503: {"description": "overloaded: the replica queue is full; retry later"},
}


# --------------------------------------------------------------------------------------------- request checks


def _parse(body: bytes) -> ClassifyRequest:
    if not body.strip():
        raise HTTPException(400, 'empty body: send JSON such as {"texts": ["some text"]}')
    try:
        raw = json.loads(body)
    except json.JSONDecodeError as exc:
        raise HTTPException(400, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise HTTPException(400, f"body is not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise HTTPException(400, "JSON nested too deeply") from None
    try:
        return ClassifyRequest.model_validate(raw)
    except ValidationError as exc:
        missing = isinstance(raw, dict) and not {"texts", "pairs"} & raw.keys()
        raise HTTPException(422, ("texts: Field required; " if missing else "") + _describe(exc)) from None


# Callers send JSON, so a wrong type is named as JSON names it, not as Python does.
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _describe(exc: ValidationError) -> str:
    """'texts[3]: Input should be a valid string (got number); probabilities: ...' from pydantic's error list."""
    errors = exc.errors(include_url=False)
    parts = []
    for e in errors[:_ERRORS_SHOWN]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".") or "body"
        got = f" (got {_JSON_TYPES.get(type(e['input']), type(e['input']).__name__)})"
        if e["type"] == "model_type":  # pydantic says "a valid dictionary or instance of ClassifyRequest"
            parts.append(f'{where}: expected a JSON object such as {{"texts": ["some text"]}}{got}')
        else:
            parts.append(f"{where}: {e['msg']}" + (got if e["type"].endswith("_type") else ""))
    if len(errors) > _ERRORS_SHOWN:
        parts.append(f"and {len(errors) - _ERRORS_SHOWN} more")
    return "; ".join(parts)


def _items(req: ClassifyRequest, text_pair: bool) -> list:
    """The request's texts, or its pairs as (first, second) tuples; a pair model takes pairs only, others texts."""
    if text_pair:
        if req.pairs is None:
            raise HTTPException(422, 'pairs: this model classifies sentence pairs; send {"pairs": [["first", "second"]]}')
        if req.texts is not None:
            raise HTTPException(422, "texts: this model classifies sentence pairs; send them as pairs, not texts")
        return list(req.pairs)
    if req.pairs is not None:
        raise HTTPException(422, 'pairs: this model classifies single texts; send {"texts": ["some text"]}')
    if req.texts is None:
        raise HTTPException(422, 'texts: Field required; send JSON such as {"texts": ["some text"]}')
    return req.texts


def _check_limits(items: list, cfg: ServeConfig) -> None:
    field = "pairs" if items and isinstance(items[0], tuple) else "texts"
    if not items:
        raise HTTPException(422, f"{field}: empty list; send at least one")
    if len(items) > cfg.max_texts:
        raise HTTPException(413, f"{field}: {len(items)} {field}; at most {cfg.max_texts} per request")
    for i, item in enumerate(items):
        for j, t in enumerate(item) if isinstance(item, tuple) else [(None, item)]:
            where = f"{field}[{i}]" + (f"[{j}]" if j is not None else "")
            if len(t) > cfg.max_text_chars:
                raise HTTPException(413, f"{where}: longer than {cfg.max_text_chars} characters ({len(t)})")
            if not t.strip():
                raise HTTPException(422, f"{where}: empty text")
            if reason := invalid_text(t):
                raise HTTPException(422, f"{where}: {reason}")


def _too_large(n: int, limit: int, cfg: ServeConfig) -> str:
    return (f"body is {n} bytes, over the {limit}-byte limit that {cfg.max_texts} texts of "
            f"{cfg.max_text_chars} characters need")


def _api_key(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        # Refuse to start rather than serve without the protection the config asked for.
        raise ConfigError([f"api_key_env: environment variable {env_name} is not set (or empty)"],
                          "serve config")
    return key


def load_predictor(cfg: ServeConfig):
    from bertray.predictor import Predictor

    gpu = cfg.gpus_per_replica > 0
    predictor = Predictor(cfg.model, device="cuda" if gpu else "cpu",
                          quantize=cfg.quantize, backend=cfg.backend, long_text=cfg.long_text,
                          token_budget=cfg.token_budget or (None if gpu else SERVE_CPU_TOKEN_BUDGET))
    predictor.warm_up()  # bf16: build the kernels for a lone text at every padded width before callers come
    return predictor


def _page(auth: bool) -> str:
    html = (resources.files("bertray") / "web" / "index.html").read_text(encoding="utf-8")
    return html.replace('<meta name="bertray-auth" content="none">',
                        f'<meta name="bertray-auth" content="{"bearer" if auth else "none"}">')


# ---------------------------------------------------------------------------------------------- deployment

# The helpers above must exist before this class: serve.ingress pickles the app, and with it the route methods and
# the module globals they use, at class definition; a helper defined later is missing in the replica.
app = FastAPI(title="bertray", description="Text classification with a fine-tuned BERT on Ray Serve.")


@serve.deployment
@serve.ingress(app)
class Classifier:
    """The model plus the HTTP API; `build_app` sets replicas, limits and resources from the ServeConfig.

    Routes check and authorize each request on their own; one continuous batcher (bertray.batching) runs the
    queued requests' texts in one pass, tokenized together, while new ones queue."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.api_key = _api_key(cfg.api_key_env)  # first: a missing key should not wait for the model to load
        self.predictor = load_predictor(cfg)
        self.info = {**self.predictor.describe(), "quantize": cfg.quantize, "backend": cfg.backend,
                     "limits": {"max_texts": cfg.max_texts, "max_text_chars": cfg.max_text_chars}}
        self.page = _page(auth=self.api_key is not None)
        self.max_body_bytes = cfg.max_texts * cfg.max_text_chars * _MAX_JSON_BYTES_PER_CHAR + _BODY_SLACK_BYTES
        # A pass tokenizes its texts in one call and runs them: per request, the tokenizer's own overhead cost more
        # CPU than the model saved by batching (BENCHMARKS.md, "Serving"). A text the tokenizer refuses was turned
        # away by _check_limits already, and a pass that raises anyway is re-run a request at a time.
        self.batcher = Batcher(self._predict, cfg.max_batch_size)

    def _predict(self, items: list) -> np.ndarray:
        if self.predictor.text_pair:
            return self.predictor.predict([a for a, _ in items], [b for _, b in items]).probs
        return self.predictor.predict(items).probs

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @app.get("/healthz", summary="liveness: 200 while the replica answers (no API key needed)")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/model", summary="model name, labels, metrics it was trained to, quantization, and request limits",
             responses={401: _ERROR_RESPONSES[401]})
    async def model(self, request: Request) -> dict:
        self._authorize(request)
        return self.info

    @app.post("/v1/classify", summary="label texts", response_model=ClassifyResponse, response_model_exclude_none=True,
              responses=_ERROR_RESPONSES, openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ClassifyRequest.model_json_schema()}}}})
    async def classify(self, request: Request, response: Response) -> dict:
        # The body is parsed here rather than by FastAPI so that auth comes first and every error says where it is.
        self._authorize(request)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            # A browser sends text/plain or a form across sites without asking first; JSON it must ask for (CORS).
            raise HTTPException(415, "send the body as JSON, with the header 'Content-Type: application/json'")
        req = _parse(await self._read_body(request))
        items = _items(req, self.predictor.text_pair)
        _check_limits(items, self.cfg)
        answer = await self.batcher.submit(items)
        # How many texts the forward pass behind this answer held, its own and other callers': batching at work.
        response.headers["X-Batch-Size"] = str(answer.batch_items)
        # And how long that pass took in the model thread (the standard header a browser's dev tools show): the
        # rest of a request's latency is the HTTP path and the wait for the model.
        response.headers["Server-Timing"] = f'model;dur={answer.pass_ms:.2f};desc="forward pass"'
        names = self.predictor.label_names
        out = []
        for p in answer.results:
            if self.predictor.multi_label:
                on = self.predictor.chosen(p)
                pred = {"labels": [names[k] for k in on], "scores": [float(p[k]) for k in on]}
            else:
                best = int(np.argmax(p))
                pred = {"label": names[best], "score": float(p[best])}
            if req.probabilities:
                pred["probabilities"] = {n: float(x) for n, x in zip(names, p)}
            out.append(pred)
        return {"predictions": out, "model": self.info["model"]}

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise HTTPException(413, _too_large(int(declared), self.max_body_bytes, self.cfg))
        body = bytearray()
        async for chunk in request.stream():  # a chunked upload has no Content-Length: count as it arrives
            body += chunk
            if len(body) > self.max_body_bytes:
                raise HTTPException(413, _too_large(len(body), self.max_body_bytes, self.cfg))
        return bytes(body)



# ------------------------------------------------------------------------------------------------------ setup


def build_app(cfg: ServeConfig) -> Application:
    """The Serve application for `cfg`: replicas (or autoscaling), limits and resources from the config."""
    errors = cfg.check()
    if errors:
        raise ConfigError(errors, "serve config")
    if cfg.autoscaling:
        # With batching a replica works best with about one batch in flight; scale out past that.
        scaling = {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                          "target_ongoing_requests": min(cfg.max_batch_size, cfg.max_ongoing_requests)}}
    else:
        scaling = {"num_replicas": cfg.replicas}
    # The API key is not handed over in a runtime env, which Ray writes to its logs: replicas read it from their
    # node's environment, which a local Ray started by `bertray serve` inherits from the launching shell (on a
    # cluster: a Kubernetes Secret in the pods' environment).
    actor = {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica}
    return Classifier.options(max_ongoing_requests=cfg.max_ongoing_requests,
                              max_queued_requests=cfg.max_queued_requests,
                              ray_actor_options=actor, **scaling).bind(cfg)


def app_builder(args: dict) -> Application:
    """Import path for `serve deploy` / a RayService: `args` are ServeConfig keys (e.g. {"model": "s3://..."})."""
    return build_app(load(ServeConfig, data=args))


def _check_model(uri: str) -> None:
    # modeling.resolve: a ModelError for a missing folder given as a path; a hub id passes through as is.
    modeling.check_classifier(uri, uri if storage.is_remote(uri) else modeling.resolve(uri))


# Serve puts HAProxy's sockets at FOLDER/<node id: 56 hex digits>/admin.sock; Linux allows 107 bytes in the path.
_SOCKET_PATH_MAX = 107 - len("/") - 56 - len("/metrics.sock")


def _private_dir() -> str:
    """A folder for HAProxy's files that only this user can enter, on the machine that starts Serve.

    Ray's default, /tmp/haproxy-serve, is shared by every user of the machine, and HAProxy's admin socket in it is
    mode 666 at admin level: any local user could have rerouted requests, bearer tokens and all. (Other nodes of a
    cluster create the folder themselves, with their default permissions.)"""
    name = f"bertray-hap-{os.getuid()}"
    path = os.path.join(tempfile.gettempdir(), name)
    if len(path) > _SOCKET_PATH_MAX:  # a long TMPDIR would make the sockets fail to bind, deep inside Serve
        path = os.path.join("/tmp", name)
    try:
        return str(storage.private_dir(path, "set TMPDIR to a folder of your own"))
    except storage.StorageError as exc:
        raise ServeStartError(str(exc)) from None


def _haproxy_binary() -> str | None:
    """The HAProxy Serve would run, found as Serve finds it; None if there is none (Ray ships it for Linux only)."""
    from ray.serve._private.haproxy import get_haproxy_binary

    try:
        return get_haproxy_binary()
    except FileNotFoundError as exc:
        if os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):  # named, but not there: say so rather than fall back
            raise ServeStartError(str(exc)) from None
        return None


# The ports HAProxy's ingress binds besides the app's, by the variable that sets each.
_HAPROXY_PORTS = {
    "RAY_SERVE_HAPROXY_STATS_PORT": "stats page",
    "RAY_SERVE_HAPROXY_METRICS_PORT": "Prometheus exporter",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": "fallback proxy",
}


def _controller_env(ingress: str) -> dict[str, str]:
    """Ray Serve settings for the controller and, through its runtime env, the proxies and replicas it starts.

    Ray reads these when each of its processes imports Serve, so they go in the processes' environment, not in an
    API call. The ingress is always the config's; the other variables, if set in ours, are passed on as set."""
    env = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": _PROXY_READY_CHECK_S}
    if ingress == "haproxy":
        # A replica that stops stays reachable this long, so that the load balancer in front drops it before it
        # closes; Ray's 30 s (sized for external balancers) made every redeploy and every stop wait 30 s. Serve's
        # own HAProxy drops it once the controller has rewritten and reloaded its config (a reload that was not
        # timed here), and retries a refused connection on another replica. A stop waits it out too, so a short
        # period keeps serve.shutdown quick (BENCHMARKS.md, "Serving").
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = _HAPROXY_DRAIN_S
        # HAProxy also binds a stats page (8404) and a Prometheus exporter (9101), and Serve keeps its Python proxy
        # on 8500 as HAProxy's fallback, all on fixed ports: a second Serve on the same machine (another user, a
        # test beside this one) then fails to start. Free ports instead.
        for name, p in zip(_HAPROXY_PORTS, free_ports(len(_HAPROXY_PORTS))):
            env[name] = str(p)
        private = _private_dir()
        for name, file in (("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "haproxy.cfg"),
                           ("RAY_SERVE_HAPROXY_SOCKET_PATH", "admin.sock"),
                           ("RAY_SERVE_HAPROXY_SERVER_STATE_FILE", "server-state"),
                           ("RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH", "metrics.sock")):
            env[name] = os.path.join(private, file)
        env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] = private
    env = {k: os.environ.get(k, v) for k, v in env.items()}
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if ingress == "haproxy" else "0"
    return env


def _port_taken(error: str, port: int | str) -> bool:
    """Whether a proxy's start-up error says that `port` itself was taken. Ray's proxy says "Failed to bind to
    address 'HOST:PORT'"; HAProxy, through Serve, "cannot bind socket (Address already in use) for [HOST:PORT]".
    The port must be the one named: the taken one may be another of theirs."""
    return (("Failed to bind" in error and f":{port}'" in error) or
            ("Address already in use" in error and f":{port}]" in error))


def _bind_error(error: str, host: str, port: int, env: dict[str, str]) -> str | None:
    """The one-line error for a proxy that could not bind a port, naming which of its ports; None if `error` is
    about something else.

    HAProxy's own ports come first. When one of them is taken, Serve retries HAProxy while the first instance still
    holds --port, so the retries report --port as taken too (seen in a fresh clone's test suite): naming
    --port would send the user after the wrong one."""
    for name, what in _HAPROXY_PORTS.items():
        if name in env and _port_taken(error, env[name]):  # as text: a variable the user set may not be a number
            advice = (f"Set {name} to a free port." if os.environ.get(name) else
                      f"Start again: bertray picks a free port each time unless {name} is set.")
            return (f"Ray Serve's HAProxy could not listen on port {env[name]}, its {what} ({name}): the port is in "
                    f"use by another process. {advice}")
    if _port_taken(error, port):
        return (f"Ray Serve's HTTP proxy could not listen on {host}:{port}: the port is in use by another process. "
                "Choose another --port, or stop that process.")
    return None


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: Ray's controller warns about those itself
        return False


def start_http(host: str, port: int, ingress: str) -> None:
    """serve.start on host:port, giving the HTTP proxy time to start on a busy node; a clear error if it does not.

    The controller options (the ingress among them) apply only when this call creates Serve's controller, as Ray
    documents for http_options.
    """
    import ray
    from ray.exceptions import ActorDiedError, RayTaskError

    from bertray.runtime import alive_nodes

    if ingress == "haproxy" and _haproxy_binary() is None:
        log.warning("HAProxy not found (Ray ships it for Linux only; RAY_SERVE_HAPROXY_BINARY_PATH names another): "
                    "serving through Ray's Python proxy instead, as with --ingress proxy")
        ingress = "proxy"
    if ingress == "haproxy" and _loopback(host) and ray.is_initialized() and (nodes := alive_nodes()) > 1:
        # Under HAProxy each replica serves HTTP itself on `host`, and HAProxy reaches replicas on other nodes by
        # their node's address: on loopback they would refuse it. Ray's proxy reaches them by actor calls instead.
        raise ServeStartError(f"--host {host} on a {nodes}-node cluster: with the HAProxy ingress, replicas on "
                              "other nodes listen on that address too, and HAProxy cannot reach them there. Serve "
                              "on --host 0.0.0.0, or choose --ingress proxy.")
    env = _controller_env(ingress)
    ready_check = env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"]
    try:
        serve.start(http_options={"host": host, "port": port},
                    controller_options={"runtime_env": {"env_vars": env}})
    except RayTaskError as exc:
        # The proxy actor raised while starting; Ray wraps that in a traceback from inside the proxy.
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        if taken := _bind_error(str(cause), host, port, env):
            raise ServeStartError(taken) from None
        raise ServeStartError(f"Ray Serve's HTTP proxy for {host}:{port} failed to start: "
                              f"{type(cause).__name__}: {cause}") from None
    except (ActorDiedError, TimeoutError) as exc:
        raise ServeStartError(f"Ray Serve's HTTP proxy for {host}:{port} did not start "
                              f"({type(exc).__name__}); the node may be overloaded, or the port taken by another "
                              f"process. Raise RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S (now {ready_check} s) "
                              f"for a slow node.") from None


def deploy(cfg: ServeConfig, name: str = "bertray", route_prefix: str = "/") -> None:
    """Start Serve's HTTP proxy on cfg.host:cfg.port and deploy the app; returns once its replicas answer. A
    ServeStartError (one line) if the proxy or the replicas cannot start."""
    start_http(cfg.host, cfg.port, cfg.ingress)
    try:
        serve.run(build_app(cfg), name=name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as exc:
        # Serve gave up on replicas that failed to start (it retries each 3 times); their own error is in the
        # log lines above, which Ray forwards from the replica and controller processes.
        if "Deploying application" not in str(exc):
            raise
        cause = _replica_error(name)
        raise ServeStartError(f"{exc} The replicas could not start" + (f": {cause}" if cause else "") +
                              " (the whole error is in the log above, from ServeReplica or ServeController)."
                              ) from None


def _replica_error(app: str) -> str:
    """The last line of the error Serve recorded for `app`'s deployments (the replica's exception), or ''."""
    try:
        deployments = serve.status().applications[app].deployments.values()
    except Exception:  # status is a nicety here: the caller's message stands without it
        return ""
    for d in deployments:
        lines = [line.strip() for line in (d.message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return ""


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(cfg: ServeConfig) -> None:
    """Serve on cfg.host:cfg.port until Ctrl-C (Ray already initialised by the CLI)."""
    # Fail here with one clear line, not in replicas that Serve restarts again and again before giving up.
    _api_key(cfg.api_key_env)
    _check_model(cfg.model)
    url = f"http://{cfg.host}:{cfg.port}"
    # `docker stop`, systemd and Kubernetes stop a server with SIGTERM: shut down as on Ctrl-C, so Serve and the
    # local Ray it started go away too (Ray's own SIGTERM handler leaves its agent processes behind).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        deploy(cfg)
        print(f"serving {cfg.model}\n  page: {url}/\n  API docs: {url}/docs\nCtrl-C to stop", flush=True)
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.shutdown()

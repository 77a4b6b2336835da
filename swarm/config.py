"""One typed, validated config: ``configs/*.yaml`` < ``SWARM_*`` environment variables < ``--set`` overrides.

Every error a user can make here (malformed YAML, unknown key, wrong type) becomes a :class:`ConfigError` whose
message is one line naming the file (or variable / override) and the dotted key at fault.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swarm.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "configs" / "default.yaml"
ENV_PREFIX = "SWARM_"
COMPRESSIONS = ("none", "fp16", "8bit")
LEDGER_ROOTS_FILE = "ledger_roots.jsonl"  # the file anchor's default, in the work directory


class _Section(BaseModel):
    # coerce_numbers_to_str: `--set run_id=2024` is YAML for a number, but the field wants a string
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class ModelConfig(_Section):
    """Which model to fine-tune. ``name_or_path`` is a hub id or a local directory for ``from_pretrained``;
    left empty, a tiny model of the Qwen2 architecture is built from the sizes below (works offline)."""

    name_or_path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    init_seed: int = 0
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(128, gt=0)
    max_positions: int = Field(128, gt=0)
    # LoRA through peft: 0 = full fine-tuning; > 0 = train only rank-r adapters (the only tensors peers average)
    lora_r: int = Field(0, ge=0)
    lora_alpha: int = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )
    # QLoRA: base weights in 4-bit NF4 (CUDA + bitsandbytes only; needs lora_r > 0)
    load_in_4bit: bool = False


class TrainingConfig(_Section):
    """One swarm epoch = one optimizer step on the swarm-averaged gradient of every peer's round of work."""

    trainer: Literal["grpo", "sft"] | None = None  # None: the recipe's own choice
    learning_rate: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)  # applied to the averaged gradient; 0 disables clipping
    prompts_per_round: int = Field(16, gt=0)  # prompts (GRPO) or examples (SFT) per peer per epoch
    num_generations: int = Field(8, ge=2)  # GRPO completions per prompt
    # rows per forward/backward; None: the whole round at once
    micro_batch_size: int | None = Field(None, gt=0)
    max_completion_length: int | None = Field(None, gt=0)  # None: the recipe's default
    # the seeded sampler's knobs (swarm/sampling.py; transformers' meaning): every peer of a run must use the same
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)  # 0: off
    top_p: float = Field(1.0, gt=0, le=1)  # 1.0: off
    min_p: float = Field(0.0, ge=0, lt=1)  # 0.0: off
    max_epochs: int | None = Field(None, gt=0)  # stop after this swarm epoch; None: run until stopped
    # share of wall time this peer computes: after each computation it idles (1 / duty_cycle - 1) x as long, to keep
    # a shared or hot machine usable (and, in bench/wan.py, to make one peer slower than the others)
    duty_cycle: float = Field(1.0, gt=0, le=1)
    seed: int = 0


class WarmStartConfig(_Section):
    """An SFT warm start for a GRPO recipe: the swarm's first ``epochs`` epochs are SFT rounds on the recipe's rows
    with its reference completion (``Recipe.warm_start_completion``), then GRPO takes over from the warmed model.

    A model that cannot yet produce a right answer gets no GRPO signal from a correctness reward (every sample of a
    group scores the same); a short SFT phase on reference answers gives it one. Warm-start rounds are averaged like
    any other, but not audited or credited (verification replays GRPO rounds).
    """

    epochs: int = Field(0, ge=0)  # 0: no warm start
    learning_rate: float | None = Field(None, gt=0)  # None: training.learning_rate
    rows: int | None = Field(None, gt=0)  # rows per peer per round; None: prompts_per_round x num_generations


class RecipeConfig(_Section):
    name: str = "arithmetic"
    options: dict[str, Any] = Field(default_factory=dict)  # recipe-specific knobs, validated by the recipe


class NetworkConfig(_Section):
    # multiaddrs of peers to join; empty: start a swarm
    initial_peers: list[str] = Field(default_factory=list)
    host_maddrs: list[str] = Field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_maddrs: list[str] = Field(default_factory=list)
    # auto: client mode when behind a NAT (swarm/network/reachability.py)
    client_mode: bool | Literal["auto"] = "auto"
    use_relay: bool = True
    use_auto_relay: bool = False
    bootstrap_attempts: int = Field(4, gt=0)
    bootstrap_backoff: float = Field(1.0, ge=0)  # seconds before the 2nd attempt; doubles after each failure
    # a DHT node not ready after this long is killed and started again (hivemind itself would wait forever)
    startup_timeout: float = Field(60.0, gt=0)


class AveragingConfig(_Section):
    # the averaging strategy (swarm/training/strategies): a registered name, an installed one (entry points
    # swarm.strategies) or path/to/file.py:ClassName; options are its keyword arguments
    strategy: str = "sync"
    options: dict[str, Any] = Field(default_factory=dict)
    compression: Literal["none", "fp16", "8bit"] = "none"
    matchmaking_time: float = Field(4.0, gt=0)  # how long a leader gathers followers before all-reduce
    allreduce_timeout: float = Field(30.0, gt=0)
    round_timeout: float = Field(60.0, gt=0)  # the longest a peer waits on others in one epoch
    peer_timeout: float = Field(15.0, gt=0)  # a peer silent for this long is considered gone
    # a peer that sees at most half of the weight it saw in the last partition_grace seconds does not step alone
    # (it waits for the others to come back, or for this long, then counts them as gone: SwarmPeer.has_quorum)
    partition_grace: float = Field(60.0, ge=0)
    max_weight: float = Field(1e6, gt=0)  # cap on the sample count any peer may claim in one round
    # mean: hivemind's weighted mean; centered_clip: each part is a CenteredClip of the members' parts (robust to
    # a minority that sends huge or skewed gradients that no audit has caught yet; docs/design.md §4)
    aggregation: Literal["mean", "centered_clip"] = "mean"
    clip_tau: float = Field(1.0, gt=0)  # CenteredClip radius, in gradient-norm units of one part
    clip_iterations: int = Field(20, gt=0)

    @field_validator("matchmaking_time")
    @classmethod
    def _longer_than_request_timeout(cls, value: float) -> float:
        if value <= 3.0:
            raise ValueError("must be greater than 3 seconds (hivemind's matchmaking request timeout)")
        return value


class DiLoCoConfig(_Section):
    """``averaging.strategy: diloco`` (swarm/training/strategies/diloco.py; Douillard et al. 2023): an epoch is
    ``inner_steps`` local optimizer steps (the training section's optimizer and learning rate) on rows assigned
    for that epoch, then one all-reduce of the pseudo-gradient θ_start − θ_local, weighted by samples, and one
    outer step that every member applies alike: SGD with Nesterov momentum on the swarm's shared state."""

    inner_steps: int = Field(10, ge=1)  # H: local steps between two all-reduces
    # a time budget for the inner steps: a peer stops after the step that reaches it (at least one, at most
    # inner_steps), so a slower peer takes fewer steps, is weighted by fewer samples and does not hold the round;
    # None: always inner_steps
    inner_seconds: float | None = Field(None, gt=0)
    outer_lr: float = Field(0.7, gt=0)  # DiLoCo's defaults
    outer_momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    # verification (verify.enabled): how many of a selected contribution's inner steps its auditors replay, drawn by
    # the round's beacon (None: all of them). A peer that cheats in one of H steps is caught by one audit with
    # probability audited_steps / H, so a contribution is caught with verify.audit_probability x that
    audited_steps: int | None = Field(None, ge=1)


class VerifyConfig(_Section):
    """Audits by replay (docs/design.md §2, steps 4 and 7): every contribution is committed before averaging; after the round
    a beacon nobody controls selects each one with probability ``audit_probability`` and assigns auditors among
    the other members of the group, who recompute its gradient from the same state and rollouts."""

    enabled: bool = True
    # 0.09: a persistent cheater is caught within 50 contributions with 99% probability (needs >= 0.088) while
    # replays cost <= 5% of training (bench/verification.py measures replay / train ~0.53 on the offline default)
    audit_probability: float = Field(0.09, ge=0, le=1)
    # a failed audit is replayed by up to this many more members of the round (every other member in rounds of up
    # to 9 peers); the panel decides by weight, and an accusation it refutes bans and slashes the accuser
    recheck_auditors: int = Field(8, ge=0)
    audit_window: int = Field(3, gt=0)  # epochs a contribution is kept and served to auditors
    ban_epochs: int = Field(50, gt=0)  # how long a peer whose audit finally failed is kept out of averaging
    # the precision class this peer computes and declares its gradients in; None: follows model.dtype
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    # relative L2 error allowed; None: the declared class's default
    tolerance: float | None = Field(None, gt=0)
    # an audited peer that does not serve its contribution in time fails
    fetch_timeout: float = Field(20.0, gt=0)
    max_contribution_mb: float = Field(512.0, gt=0)  # larger contributions are refused by auditors
    # a cheating peer for tests and demos (swarm/verify/attacks.py); `swarm local` gives it to the last peer only
    attack: str | None = None
    # with a strategy of several inner steps per epoch (DiLoCo): the attack cheats in this inner step of every epoch
    # only, and computes the others honestly (None: in every step)
    attack_step: int | None = Field(None, ge=0)


class TrustConfig(_Section):
    """Who counts (swarm/node/trust.py): identities cost nothing, so state adoption, the barrier and audit
    re-checks go by *weight*, not by the number of identities. A peer's weight is its final ledger credit for
    contributions attested by peers already trusted (their audit window closed, never slashed), starting from this
    peer itself, its initial peers and ``peers``; members of this peer's recent averaged rounds count 1 meanwhile."""

    # peer ids trusted from the start, besides the initial peers
    peers: list[str] = Field(default_factory=list)
    # credits of attested, final work before a peer has weight of its own
    min_credit: float = Field(1.0, ge=0)
    # the barrier waits at most newcomer_wait per epoch (by default as long as for anyone: newcomers of an honest
    # swarm average with it in their first round and become members) and at most newcomer_budget in all for each
    # identity without weight, so announcements from free identities stall the swarm once, for a bounded time
    newcomer_wait: float = Field(60.0, ge=0)
    newcomer_budget: float = Field(120.0, ge=0)
    member_epochs: int = Field(4, gt=0)  # a member of an averaged round counts as known for this many epochs
    refresh_seconds: float = Field(5.0, ge=0)  # ledger weights are recomputed at most this often


class SharingConfig(_Section):
    """SAPO-style rollout sharing (GRPO recipes, swarm/sharing.py): each peer publishes the completions it sampled,
    signed, and trains on a mix of its own prompt groups and groups other peers published, which it re-scores with
    its own reward functions. Every peer of a swarm must use the same settings (auditors check them)."""

    enabled: bool = False
    # share of each round's prompt groups taken from other peers (SAPO's J / (I + J)); the rest are this peer's own
    # assigned prompts, and so are any the swarm cannot fill
    external_fraction: float = Field(0.5, ge=0, le=1)
    publish: bool = True  # share this peer's own rollouts with the others
    # train on groups sampled at most this many epochs before the current one
    max_age_epochs: int = Field(1, gt=0)
    skip_uninformative: bool = True  # skip groups whose rewards are all equal (zero advantage: no gradient)
    # larger bundles (compressed) are neither published nor read; DHT nodes store at most 4 MiB per entry
    max_record_kb: float = Field(512.0, gt=0, le=4096)


class CheckpointConfig(_Section):
    every_epochs: int = Field(1, gt=0)


class MonitorConfig(_Section):
    # auto: online with an API key, else offline
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_project: str = "swarm"
    wandb_entity: str | None = None
    completions_every: int = Field(10, gt=0)  # epochs between two logs of sample completions
    # rollouts per log (WORKDIR/completions.jsonl, W&B table); 0: none
    completions_samples: int = Field(8, ge=0)
    eval_every: int = Field(20, ge=0)  # epochs between two held-out evaluations (and one at the end); 0: none
    eval_rows: int = Field(32, gt=0)  # held-out rows per evaluation (swarm/training/evaluation.py)


class LedgerConfig(BaseModel):
    """What the ledger credits, and how it replicates and anchors. The rules (the first block) must be the same on
    every peer of a swarm, or their balances differ; they are stored in each peer's ledger so that
    ``swarm ledger balance`` reads balances under the rules they were written with. Amounts are in credits
    (floats); :func:`swarm.ledger.config.rules_of` turns them into the integer micro-credit :class:`Rules`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    # --- rules (credits) ---
    credit_per_sample: float = Field(1.0, ge=0)  # per verified sample (prompt × generation) of a contribution
    audit_credit: float = Field(10.0, ge=0)  # per audit an auditor performed
    slash_amount: float = Field(100.0, ge=0)  # fixed penalty of a failed audit
    slash_per_sample: float = Field(20.0, ge=0)  # further penalty per sample of the failed contribution
    provisional_epochs: int | None = Field(None, ge=0)  # None: verify.audit_window
    # distinct failing auditors a slash needs (and they must outnumber those that passed it); None: 2
    slash_quorum: int | None = Field(None, ge=1)
    require_attestation: bool = True  # credit only commitments another member of the round attested
    # --- replication ---
    # seconds between publishing this peer's entries and pulling others'
    sync_interval: float = Field(5.0, gt=0)
    record_ttl: float = Field(7 * 24 * 3600.0, gt=0)  # seconds a published chunk of entries stays in the DHT
    # --- anchoring ---
    anchor: Literal["none", "file", "evm"] = "file"  # evm: needs the evm extra (pip install '.[evm]')
    anchor_path: Path | None = None  # file anchor; None: WORKDIR/ledger_roots.jsonl
    anchor_every: int = Field(5, gt=0)  # epochs per period: one Merkle root per period
    anchor_rpc_url: str | None = None  # evm: JSON-RPC endpoint (http(s)://, ws(s):// or an IPC socket path)
    # evm: address of the root registry (swarm.ledger.evm.deploy_anchor_contract)
    anchor_contract: str | None = None
    anchor_key_env: str = "SWARM_ANCHOR_KEY"  # evm: env variable holding the owner's hex private key
    anchor_key_file: Path | None = None  # evm: file holding that key instead (wins over anchor_key_env)
    # evm: first block scanned for posted roots (the deployment block)
    anchor_from_block: int = Field(0, ge=0)
    anchor_timeout: float = Field(120.0, gt=0)  # evm: seconds to wait for a post's receipt

    @model_validator(mode="after")
    def _evm_settings(self) -> LedgerConfig:
        if self.anchor == "evm" and not (self.anchor_rpc_url and self.anchor_contract):
            raise ValueError("ledger.anchor: evm needs ledger.anchor_rpc_url and ledger.anchor_contract")
        return self

    def anchor_file(self, workdir: Path) -> Path:
        return self.anchor_path if self.anchor_path is not None else Path(workdir) / LEDGER_ROOTS_FILE


class SwarmConfig(_Section):
    """The whole configuration of one peer (``swarm local`` gives each simulated peer a copy)."""

    run_id: str = Field("swarm-default", min_length=1, pattern=r"^[A-Za-z0-9_-]+$")
    workdir: Path = Path("swarm_work")
    identity_path: Path | None = None  # default: WORKDIR/identity.key
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    averaging: AveragingConfig = Field(default_factory=AveragingConfig)
    diloco: DiLoCoConfig = Field(default_factory=DiLoCoConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    sharing: SharingConfig = Field(default_factory=SharingConfig)
    trust: TrustConfig = Field(default_factory=TrustConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @property
    def precision(self) -> str:
        """The declared precision class: ``verify.precision``, or the one ``model.dtype`` implies."""
        implied = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.model.dtype]
        return self.verify.precision or implied

    @field_validator("workdir", "identity_path", mode="before")
    @classmethod
    def _numbers_are_paths_too(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value

    @property
    def key_path(self) -> Path:
        return self.identity_path if self.identity_path is not None else self.workdir / "identity.key"


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any, source: str) -> None:
    node = tree
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {dotted_key}: '{part}' is not a section")
        node = child
    node[leaf] = value


def _parse_scalar(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: malformed value {text!r}: {str(error).splitlines()[0]}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(dotted key, raw value, source) for each ``SWARM_<FIELD>[__<SUBFIELD>]`` variable naming a config field.

    ``SWARM_INITIAL_PEERS`` is a comma-separated shortcut for ``network.initial_peers``. Variables whose first
    part is not a config field (e.g. ``SWARM_VENV`` used by launch.sh) are not config and are left alone.
    """
    overrides = []
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        if name == "SWARM_INITIAL_PEERS":
            peers = [addr.strip() for addr in value.split(",") if addr.strip()]
            overrides.append(("network.initial_peers", yaml.safe_dump(peers, default_flow_style=True), name))
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if parts[0] in SwarmConfig.model_fields:
            overrides.append((".".join(parts), value, f"environment variable {name}"))
    return overrides


def load_config(
    path: Path | str | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> SwarmConfig:
    """Load and validate a config.

    :param path: YAML file; None means ``configs/default.yaml``
    :param overrides: ``section.key=value`` strings (values parsed as YAML: ``1e-4``, ``true``, ``[a, b]``)
    :param environ: environment to read ``SWARM_*`` overrides from (default: ``os.environ``)
    :raises ConfigError: one line naming the file/variable/override and the key at fault
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    tree = _read_yaml(path)
    origins: dict[str, str] = {}
    layered = [*env_overrides(os.environ if environ is None else environ)]
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.learning_rate=1e-4")
        layered.append((key.strip(), raw, f"--set {key.strip()}"))
    for key, raw, source in layered:
        _set_dotted(tree, key, _parse_scalar(raw, source), source)
        origins[key] = source
    try:
        return SwarmConfig.model_validate(tree)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        source = next(
            (
                src
                for k, src in origins.items()
                if key == k or key.startswith(k + ".") or k.startswith(key + ".")
            ),
            str(path),
        )
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        if first["type"] == "extra_forbidden":
            section = _section_of(key)
            if section is not None:
                message += f" (allowed: {', '.join(section.model_fields)})"
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise ConfigError(f"{source}: {key}: {message}{more}") from None


def _section_of(dotted_key: str) -> type[BaseModel] | None:
    """The model class that holds the field named by ``dotted_key`` (to list the allowed keys)."""
    model: type[BaseModel] = SwarmConfig
    for part in dotted_key.split(".")[:-1]:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def dump_config(config: SwarmConfig) -> str:
    """The effective config as YAML (what ``swarm config`` prints and each peer saves in its work directory)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

"""What one ``pdgate backend`` instance is: its deployment, its P/D role, its faults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from backends.emulator.catalog import EngineKnobs

Role = Literal["prefill", "decode", "both"]


@dataclass
class Faults:
    """Injected faults, for tests and chaos drills; changed at run time by ``/admin/faults``.

    ``fail_rate``: share of requests answered 500 before any work. ``fail_after_tokens``: a
    stream breaks after this many tokens. ``hang_after_tokens``: a stream stops sending after
    this many tokens and hangs until the client leaves. ``slowdown``: emulated time runs this
    many times slower.
    """

    fail_rate: float = 0.0
    fail_after_tokens: int | None = None
    hang_after_tokens: int | None = None
    slowdown: float = 1.0

    def update(self, changes: dict[str, object]) -> None:
        """Apply ``{"field": value}`` changes, validating each (ValueError on a bad one)."""
        for key, value in changes.items():
            if key == "fail_rate":
                rate = float(value)  # type: ignore[arg-type]
                if not 0.0 <= rate <= 1.0:
                    raise ValueError("fail_rate must be within [0, 1]")
                self.fail_rate = rate
            elif key in ("fail_after_tokens", "hang_after_tokens"):
                n = None if value is None else int(value)  # type: ignore[call-overload]
                if n is not None and n < 0:
                    raise ValueError(f"{key} must be >= 0 or null")
                setattr(self, key, n)
            elif key == "slowdown":
                x = float(value)  # type: ignore[arg-type]
                if x <= 0:
                    raise ValueError("slowdown must be > 0")
                self.slowdown = x
            else:
                raise ValueError(f"unknown fault '{key}'")

    def as_dict(self) -> dict[str, object]:
        return {
            "fail_rate": self.fail_rate,
            "fail_after_tokens": self.fail_after_tokens,
            "hang_after_tokens": self.hang_after_tokens,
            "slowdown": self.slowdown,
        }


@dataclass
class InstanceConfig:
    """Flags of ``pdgate backend``, with their defaults.

    The control plane (``/admin/faults``, ``/pdgate/kv/pull``, ``/pdgate/kv/release``, the
    bootstrap rooms, ``/flush_cache``, ``/reset_prefix_cache``) needs ``Authorization: Bearer
    <control_token>``. Without a token it is open on a loopback bind and closed (403) on any
    other, so a pod listening on 0.0.0.0 never lets a neighbour inject faults or free another
    request's KV. Instances of one deployment share the token (decode pulls KV from prefill).
    """

    device: str
    model: str
    served_model_name: str | None = None
    count: int | None = None
    tp: int = 1
    dtype: str = "bf16"
    role: Role = "both"
    host: str = "127.0.0.1"
    port: int = 8100
    advertise_host: str | None = None  # the host peers reach this instance at (default: host)
    bootstrap_port: int | None = None
    time_scale: float = 1.0
    seed: int | None = None
    kv_link: str = "roce_200g"
    kv_lease_s: float = 30.0
    rendezvous_timeout_s: float = 30.0
    default_max_tokens: int = 256
    tokenizer: str | None = None
    engine: EngineKnobs = field(default_factory=EngineKnobs)
    faults: Faults = field(default_factory=Faults)
    enable_faults: bool = False  # /admin/faults answers 403 unless on
    control_token: str | None = None  # the control plane's shared bearer token

    @property
    def loopback(self) -> bool:
        """Whether it listens on the loopback interface only."""
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    @property
    def public_host(self) -> str:
        host = self.advertise_host or self.host
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

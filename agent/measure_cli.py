"""`cvm-agent measure` and `cvm-agent eventlog`: runtime measurement from the command line. Orchestrator.

    cvm-agent measure DOMAIN OPERATION CONTENT [--register-index PCR]      through the running agent
    cvm-agent eventlog [--json] [--replay sysfs|quote] [--eventlog-path FILE] [--config FILE] [path flags]

`eventlog` prints the firmware's CCEL events followed by the agent's entries (read from the files here), or with
`--replay quote` the `cc_eventlog` of fresh evidence from the running agent; `--replay` compares the log with the
RTMRs (of that quote, or the live measurement sysfs registers) and names the first entry that diverges (exit 1).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.errors import AgentError, EvidenceParseError

if TYPE_CHECKING:  # the event log modules load when an eventlog command runs, not for every cvm-agent command
    from agent.tee import ccel, eventlog

__all__ = ["add_commands", "run"]

_RESULTS = {
    0: ("OK", ""),
    1: ("NOT_SUPPORTED", "the platform does not support runtime measurement"),
    2: ("NOT_ENABLED", "the agent does not enable event log recording ([eventlog] enabled = true)"),
}
COMMANDS = ("measure", "eventlog")


def add_commands(
    sub: Any,
    *,
    epilog: str,
    client_socket: Callable[[argparse.ArgumentParser], None],
    tee_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser("measure", help="record an event and extend a runtime register through the agent", epilog=epilog)
    client_socket(p)
    p.add_argument("domain", metavar="DOMAIN", help="event domain (no spaces), e.g. github.com/confidential-containers")
    p.add_argument("operation", metavar="OPERATION", help="event operation (no spaces), e.g. PullImage")
    p.add_argument("content", metavar="CONTENT", help="event content (one line)")
    p.add_argument("--register-index", metavar="PCR", type=int, help="PCR index (default: the agent's init_pcr)")

    p = sub.add_parser(
        "eventlog", help="print the event log (firmware + agent entries) and replay it against RTMRs", epilog=epilog
    )
    client_socket(p)
    tee_flags(p)
    p.add_argument("--eventlog-path", metavar="FILE", help="the agent's log (default [eventlog] path, $AAEL_PATH, …)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--replay",
        choices=("sysfs", "quote"),
        help="compare with the live measurement sysfs registers, or with the RTMRs of fresh evidence from the agent",
    )


def run(args: argparse.Namespace, *, load_config: Callable[[argparse.Namespace], Config], call: Any) -> int:
    if args.command == "measure":
        return _measure(args, call)
    return _eventlog(args, load_config(args), call)


def _measure(args: argparse.Namespace, call: Any) -> int:
    from agent.api._gen import attestation_agent_pb2 as aa

    request = aa.ExtendRuntimeMeasurementRequest(Domain=args.domain, Operation=args.operation, Content=args.content)
    if args.register_index is not None:
        if args.register_index < 0:
            print("cvm-agent: --register-index must not be negative", file=sys.stderr)
            return 2
        request.RegisterIndex = args.register_index
    reply = call(
        args.socket,
        "/attestation_agent.AttestationAgentService/ExtendRuntimeMeasurement",
        request,
        aa.ExtendRuntimeMeasurementResponse,
    )
    name, why = _RESULTS.get(reply.Result, (str(reply.Result), "unknown result"))
    print(name)
    if why:
        print(f"cvm-agent: {why}", file=sys.stderr)
        return 1
    return 0


def _eventlog(args: argparse.Namespace, config: Config, call: Any) -> int:
    from agent.measurement import firmware_events, log_path
    from agent.tee import eventlog

    try:
        if args.replay == "quote":
            items, actual, source = _from_agent_evidence(args, call)
        else:
            path = args.eventlog_path or log_path(config, os.environ)
            agent = _read_agent_log(path)
            items = eventlog.items(firmware_events(config.tee_paths.ccel_data), agent)
            source = f"CCEL {config.tee_paths.ccel_data} + agent log {path}"
            actual = None
            if args.replay == "sysfs":
                from agent.tee.rtmr_sysfs import SysfsRtmrs

                actual = SysfsRtmrs(config.tee_paths.tdx_measurements_dir).read_all()
                source += f"; registers from {config.tee_paths.tdx_measurements_dir}"
        report = None if actual is None else eventlog.replay(items, actual)
    except AgentError as exc:
        print(f"cvm-agent: {exc.diagnostics()}", file=sys.stderr)
        return 1
    if args.json:
        out = {"source": source, "entries": [_item_dict(i) for i in items], "replay": report and report.to_dict()}
        print(json.dumps(out, indent=2))
    else:
        sys.stdout.write(_text(source, items, report))
    return 1 if report is not None and not report.ok else 0


def _read_agent_log(path: str) -> tuple[ccel.Event, ...]:
    from agent.tee import eventlog

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return ()
    except OSError as exc:
        msg = f"the agent's event log `{path}` cannot be read: {exc.strerror}"
        raise EvidenceParseError(msg) from exc
    try:
        return eventlog.parse_agent_log(data)
    except EvidenceParseError as exc:
        msg = f"the agent's event log `{path}` does not parse: {exc}"
        raise EvidenceParseError(msg, offset=exc.offset) from exc


def _from_agent_evidence(args: argparse.Namespace, call: Any) -> tuple[tuple[eventlog.LogItem, ...], Any, str]:
    from agent.api._gen import attestation_agent_pb2 as aa
    from agent.tee import eventlog, tdx

    reply = call(
        args.socket,
        "/attestation_agent.AttestationAgentService/GetEvidence",
        aa.GetEvidenceRequest(RuntimeData=secrets.token_bytes(32)),
        aa.GetEvidenceResponse,
    )
    try:
        evidence = json.loads(reply.Evidence)
        quote = tdx.parse_quote(base64.b64decode(evidence["quote"], validate=True))
        raw = evidence["cc_eventlog"]
        items = () if raw is None else eventlog.items_from_cc_eventlog(base64.b64decode(raw, validate=True))
    except (ValueError, KeyError, TypeError) as exc:
        msg = f"the agent's evidence is not TDX evidence with a quote and cc_eventlog: {exc}"
        raise EvidenceParseError(msg) from exc
    return items, quote.body.rtmrs, "cc_eventlog and quote of fresh evidence from the agent"


def _item_dict(item: eventlog.LogItem) -> dict[str, Any]:
    return {"number": item.number, "source": item.source, **item.event.to_dict()}


def _text(source: str, items: tuple[eventlog.LogItem, ...], report: eventlog.ReplayReport | None) -> str:
    from agent.tee import ccel

    lines = [f"source: {source}", f"entries: {len(items)}"]
    for item in items:
        event = item.event
        register = f"RTMR{event.mr_index - 1}" if 1 <= event.mr_index <= ccel.RTMR_COUNT else f"MR{event.mr_index}"
        digest = event.digest(ccel.TcgAlgorithm.SHA384)
        try:
            aael = event.aael()
        except EvidenceParseError:
            aael = None
        what = aael.text if aael is not None else ""
        lines.append(
            f"{item.number:5} {item.source:8} {register:5} {event.type_name:32} "
            f"{digest.hex()[:16] if digest else '-':16} {what}".rstrip()
        )
    if report is not None:
        for r in report.registers:
            state = "ok" if r.matches else f"MISMATCH (replayed {r.replayed.hex()}, register {r.actual.hex()})"
            lines.append(f"RTMR{r.rtmr}: {r.entries} entries, {state}")
        lines.append("replay: ok" if report.ok else f"replay: diverges at {report.divergence.describe()}")  # type: ignore[union-attr]
    return "\n".join(lines) + "\n"

"""P2P stream handlers that treat what arrives as untrusted input: junk is refused with at most one log line per
(kind, source peer), never a traceback.

hivemind 1.1.12 registers each ``rpc_*`` method of a servicer (``ServicerBase.add_p2p_handlers``) through
``P2P.add_protobuf_handler``, whose stream handler (``P2P._add_protobuf_stream_handler._handle_stream``) logs a
warning *with a traceback* for every malformed frame (``TypeError: Invalid Protobuf message type``, protobuf's
``DecodeError``) and for every handler that raised, including hivemind's own unary-input wrapper refusing a stream
with zero or several requests (``ValueError: asingle() expected…``). Anyone can open such streams: a swarm peer
printed about 230 tracebacks per run under a fuzzing client.

:func:`add_quiet_handlers` registers the same methods under the same names and protocol (so honest callers see no
difference: same frames, same ``RPCError`` replies, same end of stream), with hivemind's stream loop copied and
only its error handling changed: a frame over :data:`MAX_FRAME_BYTES` is refused before it is read, and each
refusal is one line from :class:`NetworkInputLog`. It is a seam of our servicers (``SwarmAverager.add_p2p_handlers``
calls it), not a patch of hivemind. Unary handlers (the DHT's) are left to hivemind: its unary path returns a
failure to the caller without logging anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import closing, suppress
from typing import Any

from google.protobuf.message import Message
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto.p2pd_pb2 import RPCError

logger = logging.getLogger(__name__)

# a request frame larger than this is refused unread (all-reduce parts are ~0.5 MiB)
MAX_FRAME_BYTES = 32 << 20
MAX_PREFETCH = 5  # requests buffered per stream, as hivemind's default
MAX_LOGGED_SOURCES = 4096  # (kind, peer) pairs remembered; past this, refusals are logged at debug level only


class Junk(ValueError):
    """A stream that does not follow the protocol: ``kind`` (a few words, the same for every such stream) and
    ``detail`` (one line)."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}{': ' + detail if detail else ''}")
        self.kind, self.detail = kind, detail


class NetworkInputLog:
    """Logs a refused network input once per (kind, source peer) at warning level, and at debug level after that."""

    def __init__(self, logger_: logging.Logger = logger, level: int = logging.WARNING):
        self._logger, self._level = logger_, level
        self._seen: set[tuple[str, str]] = set()
        self.counts: dict[str, int] = {}  # refusals by kind, for tests and benchmarks

    def refused(self, kind: str, source: Any, detail: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        pair = (kind, str(source))
        first = pair not in self._seen and len(self._seen) < MAX_LOGGED_SOURCES
        if first:
            self._seen.add(pair)
        self._logger.log(
            self._level if first else logging.DEBUG,
            f"Refused {kind} from {source}{': ' + detail if detail else ''}",
        )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())[:160]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def _receive(input_type: type[Message], reader: asyncio.StreamReader) -> Message | None:
    """One request frame (hivemind's ``P2P.receive_protobuf``), bounded; None for an error or end-of-stream frame.

    :raises Junk: an unknown frame marker, an oversized frame, or bytes that are not a ``input_type``
    :raises asyncio.IncompleteReadError: the caller closed the stream
    """
    marker = await reader.readexactly(1)
    if marker not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
        raise Junk("an unknown frame marker", repr(marker))
    length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if length > MAX_FRAME_BYTES:
        raise Junk("an oversized frame", f"{length} bytes > {MAX_FRAME_BYTES}")
    data = await reader.readexactly(length)
    message = input_type() if marker == P2P.MESSAGE_MARKER else RPCError()
    try:
        message.ParseFromString(data)
    except Exception as error:
        raise Junk(f"a frame that is not a {type(message).__name__}", _one_line(error)) from None
    return message if marker == P2P.MESSAGE_MARKER else None


async def _single(requests: AsyncIterator[Message]) -> Message:
    """The only request of a unary-input call (hivemind's ``asingle``). :raises Junk: none or several"""
    count, first = 0, None
    async for request in requests:
        count += 1
        if count == 1:
            first = request
        else:
            raise Junk("several requests to a unary-input handler")
    if first is None:
        raise Junk("no request to a unary-input handler")
    return first


def quiet_stream_handler(
    p2p: P2P,
    name: str,
    method: Callable[..., Any],
    input_type: type[Message],
    stream_input: bool,
    stream_output: bool,
    log: NetworkInputLog,
) -> Callable[[StreamInfo, asyncio.StreamReader, asyncio.StreamWriter], Any]:
    """The binary stream handler hivemind's ``add_protobuf_handler`` would register for ``method``, with quiet
    refusals (see the module docstring). ``name`` appears in log lines."""
    short = name.rsplit(".", 1)[-1]

    async def handle(
        stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        source: PeerID = stream_info.peer_id
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=source)
        requests: asyncio.Queue = asyncio.Queue(MAX_PREFETCH)

        async def read_stream() -> AsyncIterator[Message]:
            while True:
                request = await requests.get()
                if request is None:
                    break
                yield request

        async def process_stream() -> None:
            try:
                argument = read_stream() if stream_input else await _single(read_stream())
                output = method(argument, context)
                responses = output if hasattr(output, "__aiter__") else _as_stream(output)
                async for response in responses:
                    try:
                        await P2P.send_protobuf(response, writer)
                    except Exception as error:  # the caller closed or broke the connection: it sees the error
                        logger.debug(f"{short}: could not send a response to {source}: {_one_line(error)}")
                        break
            except Junk as error:
                log.refused(f"{error.kind} on {short}", source, error.detail)
                await _report(error, writer)
            except Exception as error:
                log.refused(f"a {short} call that failed ({type(error).__name__})", source, _one_line(error))
                await _report(error, writer)

        with closing(writer):
            processing = asyncio.create_task(process_stream())
            try:
                while True:
                    receiving = asyncio.create_task(_receive(input_type, reader))
                    await asyncio.wait({processing, receiving}, return_when=asyncio.FIRST_COMPLETED)
                    if processing.done():
                        receiving.cancel()
                        return
                    try:
                        request = await receiving
                    except asyncio.IncompleteReadError:  # the caller closed the stream (cancelled or died)
                        return
                    await requests.put(request)  # None ends the stream
            except Junk as error:
                log.refused(f"{error.kind} on {short}", source, error.detail)
            except Exception as error:
                log.refused(f"a broken {short} stream ({type(error).__name__})", source, _one_line(error))
            finally:
                processing.cancel()

    return handle


async def _as_stream(awaitable: Any) -> AsyncIterator[Any]:
    yield await awaitable


async def _report(error: BaseException, writer: asyncio.StreamWriter) -> None:
    with suppress(Exception):  # the connection may be what failed
        await P2P.send_protobuf(RPCError(message=str(error)), writer)


async def add_quiet_handlers(
    servicer: Any,
    p2p: P2P,
    wrapper: Any = None,
    *,
    namespace: str | None = None,
    balanced: bool = False,
    log: NetworkInputLog | None = None,
) -> NetworkInputLog:
    """``ServicerBase.add_p2p_handlers`` with :func:`quiet_stream_handler` for every streaming ``rpc_*`` method
    (unary ones are registered by hivemind as before); the log that counts refusals is returned."""
    log = log or NetworkInputLog()
    servicer._collect_rpc_handlers()
    target = servicer if wrapper is None else wrapper
    registrations = []
    for handler in servicer._rpc_handlers:
        name = servicer._get_handle_name(namespace, handler.method_name)
        method = getattr(target, handler.method_name)
        if not handler.stream_input and not handler.stream_output:
            registrations.append(
                p2p.add_protobuf_handler(name, method, handler.request_type, balanced=balanced)
            )
            continue
        stream_handler = quiet_stream_handler(
            p2p, name, method, handler.request_type, handler.stream_input, handler.stream_output, log
        )
        registrations.append(p2p.add_binary_stream_handler(name, stream_handler, balanced=balanced))
    await asyncio.gather(*registrations)
    return log

"""The task inbox: which tasks this server takes, and the answer at once for those it does not.

A task is refused as bad input (counted, dead-lettered) when it arrives on a topic that is not this
node's or one of its pools' inboxes, cannot be decoded, or asks for a reply where the reply rules
forbid; one that failed only validation is still answered with an error when its mapping names a
usable id, sender and reply_to. A decoded task is then, in this order: a duplicate of one answered
(the cached result again) or in progress (it waits for the same answer), a reused id (an error),
unknown here (unknown-task), refused for lack of room or while draining (rejected-busy), or queued.
"""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError

from agent_common.badinput import RateLimitedLog
from agent_common.decoding import decode_or_count
from agent_common.registry import TaskSpec
from cloud_agent.cache import content_digest
from cloud_agent.clock_offsets import ClockOffsetWatch
from cloud_agent.jobs import Job
from cloud_agent.node import ServerNode
from cloud_agent.replies import BadInput, Replies, content_type
from cloud_agent.workers import Workers
from topics.codec import Codec
from topics.errors import DecodeError, TopicError
from topics.models import Result, Status, Task, TaskName
from topics.names import Kind, validate_node_id
from topics.transport import Message

_ANSWERABLE = frozenset({"schema", "version"})  # decode failures whose mapping may name id and reply_to
_TASK_NAME: TypeAdapter[str] = TypeAdapter(TaskName)


class Admission:
    """Admits the tasks of one server node onto its job board, or answers them at once.

    ``overload`` logs the rejected-busy answers; :attr:`clock_offsets` measures each sender's clock
    from the tasks admitted.
    """

    def __init__(self, node: ServerNode, workers: Workers, replies: Replies, *,
                 overload: RateLimitedLog) -> None:
        self._node = node
        self._workers = workers
        self._replies = replies
        self._overload = overload
        self.clock_offsets = ClockOffsetWatch()

    def on_task(self, message: Message) -> None:
        """Decode and admit a task, or answer it at once (busy, duplicate, unknown, bad)."""
        node = self._node
        node.board.count("received")
        parsed = node.tree.parse(message.topic)
        try:
            if parsed is None or parsed.kind is not Kind.TASK:
                raise BadInput("wrong-topic", f"not a task topic under {node.tree.prefix}")
            if parsed.pool is None and parsed.node != node.id:
                raise BadInput("wrong-node", f"task addressed to node {parsed.node!r}, this is "
                               f"{node.id!r}")
            if parsed.pool is not None and parsed.pool not in node.config.pools:
                raise BadInput("wrong-pool", f"task for pool {parsed.pool!r}, this node serves "
                               f"{list(node.config.pools)}")
        except BadInput as exc:
            self._replies.reject(message, exc)
            return
        codec = self._replies.codec_for(message)
        task = decode_or_count(codec, message, Task, self._replies.bad_input, kind=None,
                               on_error=lambda exc: self._refuse_invalid(message, exc))
        if task is None:
            return
        try:
            self._replies.rules.check(task.reply_to, task.sender)
        except BadInput as exc:
            self._replies.reject(message, exc, task_id=task.id)
            return
        self.clock_offsets.observe(task.sender, task.created, node.clock())
        self._admit(task, codec)

    def _refuse_invalid(self, message: Message, error: DecodeError) -> None:
        """Dead-letter a task that cannot be decoded; answer it when it failed only validation."""
        self._replies.dead_letter(message, error)
        if error.reason in _ANSWERABLE:
            self._answer_invalid(message, error)

    def _answer_invalid(self, message: Message, error: DecodeError) -> None:
        """An ``error`` Result for a task that failed validation, when its mapping names a usable
        ``id``, ``sender`` and ``reply_to`` (the reply rules apply): the client need not time out."""
        codec = self._replies.codec_for(message)
        try:
            fields = codec.decode_mapping(message.payload, topic=message.topic)
        except DecodeError:
            return
        task_id, sender, reply_to = fields.get("id"), fields.get("sender"), fields.get("reply_to")
        if not (isinstance(task_id, str) and 0 < len(task_id) <= 128 and isinstance(sender, str)
                and isinstance(reply_to, str)):
            return
        try:
            self._replies.rules.check(reply_to, validate_node_id(sender))
        except (BadInput, TopicError):
            return
        name = fields.get("task")
        try:
            name = _TASK_NAME.validate_python(name)
        except ValidationError:
            name = None
        attempt = fields.get("attempt")
        result = Result(task_id=task_id, status=Status.ERROR, server=self._node.id, task=name,
                        error=f"invalid task ({error.reason}): {error.detail}"[:4096],
                        attempt=attempt if type(attempt) is int and 1 <= attempt <= 100 else 1,
                        content_type=content_type(codec))
        self._node.board.count("invalid_answered")
        self._replies.result(result, reply_to, codec)

    def _admit(self, task: Task, codec: Codec) -> None:
        board, registry = self._node.board, self._node.registry
        key = (task.sender, task.id)
        digest = content_digest(task)
        now = self._node.monotonic()
        spec: TaskSpec | None = None
        cached: Result | None = None
        reused = False
        with board.lock:
            entry = board.cache.entry(key, now)
            running = board.in_progress.get(key) if entry is None else None
            if entry is not None:
                cached, reused = entry[0], entry[1] != digest
            elif running is not None:  # a retry while the first is queued or running
                reused = running.digest != digest
                if not reused:
                    running.waiters.append((task.reply_to, codec, task.attempt))
                    board.counters["duplicates"] += 1
                    return
            else:
                spec = registry.get(task.task) if task.task in registry else None
                if spec is not None and not board.draining and board.has_room():
                    board.enqueue(self._new_job(task, spec, codec, key, digest, now))
                    return
            if reused:
                board.counters["id_reused"] += 1
            elif cached is not None:
                board.counters["duplicates"] += 1
        if reused:
            self._reply_now(task, codec, Status.ERROR,
                            f"task id {task.id!r} was already used by {task.sender!r} for a different "
                            "task (name, payload, stage or reply_to differ): send new work under a "
                            "new id", cache=False)
            return
        if cached is not None:
            self._replies.result(cached.model_copy(update={"attempt": task.attempt}), task.reply_to, codec)
            return
        if spec is None:
            self._reply_now(task, codec, Status.UNKNOWN_TASK,
                            f"unknown task {task.task!r}; this server runs "
                            f"{', '.join(registry.names())}", digest=digest)
        else:
            config = self._node.config
            reason = "server is shutting down" if board.draining else (
                f"queue full ({config.queue_size} waiting, {config.workers} running)")
            self._overload.record("rejected-busy", f"tasks answered rejected-busy: {reason}")
            self._reply_now(task, codec, Status.REJECTED_BUSY, reason)

    def _new_job(self, task: Task, spec: TaskSpec, codec: Codec, key: tuple[str, str], digest: bytes,
                 now: float) -> Job:
        deadline = None
        if task.ttl is not None:  # relative: counted on our clock from receipt, whatever the sender's
            deadline = now + task.ttl
        elif task.deadline is not None:  # legacy absolute time: right only if both clocks agree
            deadline = now + (task.deadline - self._node.clock())
        job = Job(task=task, spec=spec, codec=codec, key=key, digest=digest, accepted=now,
                  deadline=deadline)
        self._workers.watch(job)
        return job

    def _reply_now(self, task: Task, codec: Codec, status: Status, error: str, *,
                   cache: bool = True, digest: bytes = b"") -> None:
        """Answer at once; cached (under ``digest``) unless rejected-busy or ``cache`` is False."""
        result = Result(task_id=task.id, status=status, server=self._node.id, task=task.task,
                        error=error, attempt=task.attempt, content_type=content_type(codec))
        board = self._node.board
        board.count(f"completed:{Status(status).value}")
        if cache and status is not Status.REJECTED_BUSY:
            with board.lock:
                board.cache.put((task.sender, task.id), result, self._node.monotonic(), digest=digest)
        self._replies.result(result, task.reply_to, codec)


__all__ = ["Admission"]

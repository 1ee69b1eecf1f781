"""`det.core.DistributedContext`: the ranks of a trial's processes and
Determined's small collectives between them (`allgather`, `gather`,
`broadcast` and their `_local` forms, for coordination, not for tensors).

As Determined's: the chief (rank 0) serves every process of the trial; on a
node with several of them, the local chief (local rank 0) also serves the
others on that node, and tells them where through a first global
`allgather`. The transport is `resolute._collectives` (authenticated TCP)."""

import os

from resolute import _collectives


def _env_int(name):
    value = os.environ.get(name)
    if value is None:
        raise KeyError(
            "{} is not set: start the processes with a launcher (python3 -m "
            "determined.launch.torch_distributed ...) or with torchrun".format(name)
        )
    return int(value)


class _Group:
    """The collectives of one group of processes (all of the trial's, or
    those of one node): its chief holds a `Server`, every other member a
    channel to it; a group of one needs neither."""

    def __init__(self, size):
        self.size = size
        self.server = None
        self.channel = None

    def gather(self, stuff):
        if self.size < 2:
            return [stuff]
        if self.server is not None:
            out = [stuff, *self.server.gather()]
            # Nobody sends the next gather's value before all sent this one's.
            self.server.broadcast(None)
            return out
        self.channel.send(stuff)
        self.channel.recv()
        return None

    def allgather(self, stuff):
        if self.size < 2:
            return [stuff]
        if self.server is not None:
            out = [stuff, *self.server.gather()]
            self.server.broadcast(out)
            return out
        self.channel.send(stuff)
        return self.channel.recv()

    def broadcast(self, stuff):
        if self.size < 2:
            return stuff
        if self.server is not None:
            self.server.broadcast(stuff)
            return stuff
        return self.channel.recv()

    def close(self):
        for end in (self.server, self.channel):
            if end is not None:
                end.close()


class DistributedContext:
    """Where this process sits in the trial: `rank` of `size` processes,
    `local_rank` of the `local_size` on its node, on node `cross_rank` of
    `cross_size`. `chief_ip` reaches rank 0's node (needed when the trial
    spans nodes). The collectives meet on the port the node gives the trial
    (`RESOLUTE_COLLECTIVES_PORT`), or on `pub_port + port_offset` when given."""

    def __init__(
        self,
        *,
        rank=None,
        size=None,
        local_rank=None,
        local_size=None,
        cross_rank=None,
        cross_size=None,
        chief_ip=None,
        pub_port=None,
        pull_port=None,
        port_offset=0,
        force_tcp=False,
    ):
        ranks = (rank, size, local_rank, local_size, cross_rank, cross_size)
        if sum(x is not None for x in ranks) not in (0, 6):
            raise ValueError(
                "rank, size, local_rank, local_size, cross_rank, and cross_size must all be "
                "provided if any are provided"
            )
        self.rank = 0 if rank is None else int(rank)
        self.size = 1 if size is None else int(size)
        self.local_rank = 0 if local_rank is None else int(local_rank)
        self.local_size = 1 if local_size is None else int(local_size)
        self.cross_rank = 0 if cross_rank is None else int(cross_rank)
        self.cross_size = 1 if cross_size is None else int(cross_size)
        if not (0 <= self.rank < self.size and 0 <= self.local_rank < self.local_size):
            raise ValueError("rank {} of {} (local {} of {})".format(self.rank, self.size, self.local_rank, self.local_size))
        if self.local_size != self.size:
            if chief_ip is None:
                raise ValueError(
                    "local_size != size ({} != {}) but no chief_ip: when the trial spans nodes, pass "
                    "chief_ip= (or set DET_CHIEF_IP)".format(self.local_size, self.size)
                )
            self._chief_ip = chief_ip
        else:
            # Every process is on this node: the chief is reached on loopback.
            self._chief_ip = "127.0.0.1"
        self._port_given = None if pub_port is None else int(pub_port) + int(port_offset)
        self._port_offset = int(port_offset)
        self._all = _Group(self.size)
        self._node = _Group(self.local_size)
        self._closed = False
        self._init_ipc()

    def _port(self):
        if self._port_given is not None:
            return self._port_given
        text = os.environ.get("RESOLUTE_COLLECTIVES_PORT")
        if not text:
            raise _collectives.CollectivesError(
                "RESOLUTE_COLLECTIVES_PORT is not set: on a Resolute cluster the node sets it; off a "
                "cluster pass pub_port= to DistributedContext"
            )
        return int(text) + self._port_offset

    def _init_ipc(self):
        if self.size < 2:
            return
        key = _collectives.secret_from_env()
        if self.rank == 0:
            host = "0.0.0.0" if self.cross_size > 1 else "127.0.0.1"
            self._all.server = _collectives.Server(host, self._port(), range(1, self.size), key)
            self._all.server.accept_all()
        else:
            self._all.channel = _collectives.connect(self._chief_ip, self._port(), self.rank, key)
        if self.local_size < 2:
            # No local chief here, but the others' first allgather needs us.
            self.allgather(None)
            return
        if self.local_rank == 0:
            self._node.server = _collectives.Server("127.0.0.1", 0, range(1, self.local_size), key)
            self.allgather((self.cross_rank, self._node.server.port))
            self._node.server.accept_all()
        else:
            chiefs = [x for x in self.allgather(None) if x is not None and x[0] == self.cross_rank]
            if len(chiefs) != 1:
                raise _collectives.CollectivesError(
                    "node {} has {} local chiefs: {}".format(self.cross_rank, len(chiefs), chiefs)
                )
            self._node.channel = _collectives.connect("127.0.0.1", chiefs[0][1], self.local_rank, key)

    @classmethod
    def from_torch_distributed(cls, chief_ip=None):
        """The ranks torchrun (or `determined.launch.torch_distributed`) gives
        this process."""
        return cls(
            rank=_env_int("RANK"),
            size=_env_int("WORLD_SIZE"),
            local_rank=_env_int("LOCAL_RANK"),
            local_size=_env_int("LOCAL_WORLD_SIZE"),
            cross_rank=_env_int("GROUP_RANK"),
            cross_size=_env_int("GROUP_WORLD_SIZE"),
            chief_ip=chief_ip or os.environ.get("DET_CHIEF_IP"),
        )

    @classmethod
    def from_horovod(cls, hvd, chief_ip=None):
        return cls(
            rank=hvd.rank(),
            size=hvd.size(),
            local_rank=hvd.local_rank(),
            local_size=hvd.local_size(),
            cross_rank=hvd.cross_rank(),
            cross_size=hvd.cross_size(),
            chief_ip=chief_ip or os.environ.get("DET_CHIEF_IP"),
        )

    @classmethod
    def from_deepspeed(cls, chief_ip=None):
        return cls(
            rank=_env_int("RANK"),
            size=_env_int("WORLD_SIZE"),
            local_rank=_env_int("LOCAL_RANK"),
            local_size=_env_int("LOCAL_SIZE"),
            cross_rank=_env_int("CROSS_RANK"),
            cross_size=_env_int("CROSS_SIZE"),
            chief_ip=chief_ip or os.environ.get("DET_CHIEF_IP"),
        )

    def get_rank(self):
        return self.rank

    def get_size(self):
        return self.size

    def get_local_rank(self):
        return self.local_rank

    def get_local_size(self):
        return self.local_size

    def get_cross_rank(self):
        return self.cross_rank

    def get_cross_size(self):
        return self.cross_size

    def get_num_agents(self):
        return self.cross_size

    def gather(self, stuff):
        """The chief returns everyone's `stuff` in rank order; the others None."""
        return self._all.gather(stuff)

    def allgather(self, stuff):
        """Everyone's `stuff`, in rank order, on every process."""
        return self._all.allgather(stuff)

    def broadcast(self, stuff):
        """The chief's `stuff` on every process."""
        return self._all.broadcast(stuff)

    def gather_local(self, stuff):
        """`gather` among the processes of this node (to local rank 0)."""
        return self._node.gather(stuff)

    def allgather_local(self, stuff):
        return self._node.allgather(stuff)

    def broadcast_local(self, stuff=None):
        return self._node.broadcast(stuff)

    def close(self):
        if self._closed:
            return
        self._closed = True
        self._all.close()
        self._node.close()


class DummyDistributedContext(DistributedContext):
    """One process: rank 0 of 1."""

    def __init__(self):
        super().__init__(rank=0, size=1, local_rank=0, local_size=1, cross_rank=0, cross_size=1)

"""Protocol errors: a message that breaks the rules, and a run that cannot finish safely."""


class ProtocolError(Exception):
    """A message was refused (wrong stage or session, unknown sender, bad size or shape).
    The receiving state machine is unchanged and can go on."""


class ProtocolAbort(ProtocolError):
    """Too few parties are left to finish without revealing anything: the instance stops."""


class CheatingDetected(ProtocolAbort):
    """Clients proved to have cheated (a forged share, a seed other than the one committed to), so
    the instance stops; a retry without ``clients`` can succeed."""

    def __init__(self, message: str, clients: set[int]):
        super().__init__(message)
        self.clients = set(clients)

"""Protocol errors: a message that breaks the rules, and a run that cannot finish safely."""


class ProtocolError(Exception):
    """A message was refused (wrong stage or session, unknown sender, bad size or shape).
    The receiving state machine is unchanged and can go on."""


class ProtocolAbort(ProtocolError):
    """Too few parties are left to finish without revealing anything: the instance stops."""

"""A run's privacy bookkeeping: the DP budget and noise (``budget``), the parties' signed ledgers
(``ledgers``) and the threat model stated to users and auditors (``threat_model``).

May import: ``fedsecmem.config``, ``fedsecmem.errors``, ``fedsecmem.audits``, ``fedsecmem.protocols``,
``fedsecmem.crypto``; nothing of the detector or the method.
"""

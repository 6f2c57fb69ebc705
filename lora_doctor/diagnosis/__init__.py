"""The diagnosis pass: reasoning across findings, after the checks of each look.

A check reports what it sees in the data it declared; this package decides what the findings mean
together: which finding explains which (a NaN explains the flat loss after it), which are stood
down, and the ranked candidate causes of each symptom, with fixes built from the run's own facts
(DESIGN.md section 1, "The check contract", layer 3).

Modules: ``reasoning`` (the pass the engine runs), ``causes`` (candidate causes and the fixes
built from facts), ``crashes`` (why a run died of an exception).
"""

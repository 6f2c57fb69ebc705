"""The diagnosis pass: reasoning over findings and facts, the candidate causes of each symptom, and
why a run died (:mod:`lora_doctor.diagnosis.crashes`)."""

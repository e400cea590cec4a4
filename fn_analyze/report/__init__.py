"""Reading results: mask files shown and compared (`show`, `compare`), evaluate's printed table
(`eval_table`) and the figures (`plots`)."""

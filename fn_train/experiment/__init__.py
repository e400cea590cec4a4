"""`fn-train experiment`: the seed's question answered in one command. Fine-tuning arms (plain LoRA,
networks off, only networks kept, only their neurons learning) over seeds, each masked arm next to
random neurons of the same counts per layer and per magnitude bin, scored on the task's held-out rows
and on a retention set before and after."""

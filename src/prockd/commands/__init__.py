"""Each task's side of the ``prockd`` commands that exist for both tasks (train, pretrain a teacher, evaluate,
analyse, the demo, the comparison, the speed benchmark). This layer sits above the task folders and the benchmarks
built on them, so imports still go one way only: ``classification`` / ``detection`` <- ``bench`` <- ``commands``
<- ``tasks`` <- ``cli``."""

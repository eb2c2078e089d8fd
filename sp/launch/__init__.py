"""Process bootstrap for torchrun, Slurm, Open MPI, MPICH/PMI and mpi4py launches."""

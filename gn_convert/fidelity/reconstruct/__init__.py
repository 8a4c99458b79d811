"""Block-wise reconstruction: each block fit to the teacher's block output."""

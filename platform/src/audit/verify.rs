//! Recomputing the tree from the events table and comparing it with the stored leaves and every
//! signed head: intact, or the first position that differs and how.

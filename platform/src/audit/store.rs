//! The tree as stored: leaves (`audit_leaves`), complete subtrees (`audit_nodes`), the fold's
//! progress (`audit_tree`) and signed heads (`audit_heads`); proofs and roots served from them.

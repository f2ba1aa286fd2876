//! The tree's pure algorithms: roots, inclusion and consistency proofs in the RFC 9162 §2.1 shape,
//! and their verification.

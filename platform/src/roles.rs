//! The role catalogue as the read side sees it (the read side does not reach into the domain).

/// Every role and the permissions it grants.
#[must_use]
pub fn catalogue() -> Vec<(String, Vec<String>)> {
    cairn_domain::roles::seeded_roles()
        .into_iter()
        .map(|(name, perms)| (name.to_owned(), perms.into_iter().map(str::to_owned).collect()))
        .collect()
}

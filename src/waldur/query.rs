//! Filters, ordering, sparse fields and page size for listing server groups.

use super::client::MAX_PAGE_SIZE;
use super::model::WaldurUuid;

/// A list or count request. Built with chained setters:
/// `ListQuery::new().tenant_uuid(&t).name_exact("web").fields(&["uuid", "state"])`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    filters: Vec<(&'static str, String)>,
    fields: Vec<String>,
    page_size: Option<u32>,
    /// `o=`: without it a real Waldur orders only by tenant name, so the rows of one tenant
    /// move between requests and a paged read repeats some and skips others.
    order: Option<String>,
}

/// The order every paged list asks for unless told otherwise: oldest first, which also puts
/// groups created during a read on its last page instead of shifting the others. Two groups
/// created in the same microsecond (a bulk import) tie on `created`, and PostgreSQL orders
/// ties as it likes, differently per page: the name breaks them (review m17; uuid is not among
/// Waldur's ordering fields).
pub const DEFAULT_ORDER: &str = "created,name";

impl ListQuery {
    pub fn new() -> Self {
        Self::default()
    }

    fn filter(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.filters.push((key, value.into()));
        self
    }

    /// Name contains `name` (case-insensitive in Waldur).
    pub fn name(self, name: &str) -> Self {
        self.filter("name", name)
    }
    pub fn name_exact(self, name: &str) -> Self {
        self.filter("name_exact", name)
    }
    pub fn tenant_uuid(self, tenant: &WaldurUuid) -> Self {
        self.filter("tenant_uuid", tenant.as_str())
    }
    /// The tenant's URL, as Waldur writes it in the `tenant` field.
    pub fn tenant(self, tenant_url: &str) -> Self {
        self.filter("tenant", tenant_url)
    }
    pub fn project_uuid(self, project: &WaldurUuid) -> Self {
        self.filter("project_uuid", project.as_str())
    }
    pub fn customer_uuid(self, customer: &WaldurUuid) -> Self {
        self.filter("customer_uuid", customer.as_str())
    }
    pub fn uuid(self, uuid: &WaldurUuid) -> Self {
        self.filter("uuid", uuid.as_str())
    }
    /// Exact Nova server-group id.
    pub fn backend_id(self, backend_id: &str) -> Self {
        self.filter("backend_id", backend_id)
    }
    /// Repeatable. Waldur accepts only its own vocabulary here (the other answers 400), so the
    /// label is sent exactly as given.
    pub fn state(self, label: &str) -> Self {
        self.filter("state", label)
    }
    /// Description contains.
    pub fn description(self, text: &str) -> Self {
        self.filter("description", text)
    }
    /// `o=`: `name`, `created`, `state`, ... with `-` for descending, instead of the default
    /// (`created`). Use a key that orders every row apart, or pages may still overlap.
    pub fn order_by(mut self, key: &str) -> Self {
        self.order = Some(key.to_string());
        self
    }

    /// Asks for these fields only (`field=` repeated); unknown names are ignored by Waldur.
    pub fn fields(mut self, fields: &[&str]) -> Self {
        self.fields.extend(fields.iter().map(|f| f.to_string()));
        self
    }

    /// Items per page, capped at Waldur's maximum of 300 (the default here: fewest requests).
    pub fn page_size(mut self, size: u32) -> Self {
        self.page_size = Some(size.clamp(1, MAX_PAGE_SIZE));
        self
    }

    /// The filters alone, for a HEAD count.
    pub(crate) fn filter_params(&self) -> Vec<(&'static str, String)> {
        self.filters.clone()
    }

    /// Groups a page holds.
    pub(crate) fn size(&self) -> u32 {
        self.page_size.unwrap_or(MAX_PAGE_SIZE)
    }

    pub(crate) fn params_for_page(&self, page: u32) -> Vec<(&'static str, String)> {
        let mut params = self.filters.clone();
        params.push((
            "o",
            self.order.as_deref().unwrap_or(DEFAULT_ORDER).to_string(),
        ));
        params.extend(self.fields.iter().map(|f| ("field", f.clone())));
        params.push((
            "page_size",
            self.page_size.unwrap_or(MAX_PAGE_SIZE).to_string(),
        ));
        params.push(("page", page.to_string()));
        params
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_carry_filters_fields_and_the_largest_page_size() {
        let t = WaldurUuid::parse("6b2a0c4e-9f1d-4b7a-8c3e-2f1a0b9c8d7e").unwrap();
        let q = ListQuery::new()
            .tenant_uuid(&t)
            .state("OK")
            .state("ERRED")
            .fields(&["uuid", "state"]);
        let p = q.params_for_page(2);
        assert!(p.contains(&("tenant_uuid", "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e".into())));
        assert_eq!(p.iter().filter(|(k, _)| *k == "state").count(), 2);
        assert_eq!(p.iter().filter(|(k, _)| *k == "field").count(), 2);
        assert!(p.contains(&("page_size", "300".into())));
        assert!(p.contains(&("page", "2".into())));
        assert!(
            p.contains(&("o", "created,name".into())),
            "every page names a stable order"
        );
        assert!(
            ListQuery::new()
                .order_by("-name")
                .params_for_page(1)
                .contains(&("o", "-name".into()))
        );
        assert_eq!(ListQuery::new().page_size(5000).page_size, Some(300));
    }
}
